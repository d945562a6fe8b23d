"""bench/bench_selection.py's pure parts: the prompt subset and seeds, the rules' request
bodies, the judge's win rate, the bootstrap summaries and the per-setting aggregation (the
benchmark itself needs an engine and is not a test)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from runtime.prompts import PromptItem

_BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(_BENCH))  # bench_selection imports its sibling `common`
_spec = importlib.util.spec_from_file_location("bench_selection", _BENCH / "bench_selection.py")
bs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bs)


def test_subset_alternates_kinds_and_seeds_keep_child_ranges_apart():
    items = [PromptItem(f"h{i}", f"help {i}", "helpful") for i in range(3)] + [
        PromptItem(f"a{i}", f"adv {i}", "adversarial") for i in range(3)]
    assert [p.id for p in bs.subset(items, 4)] == ["h0", "a0", "h1", "a1"]
    seeds = [bs.prompt_seed(i) for i in range(12)]
    # N = 32 children and the reference's seeds (offset 500, 16 of them) never overlap
    ranges = [set(range(s, s + 32)) | set(range(s + bs.REF_SEED_OFFSET,
                                                s + bs.REF_SEED_OFFSET + 16)) for s in seeds]
    assert all(not (ranges[i] & ranges[j]) for i in range(12) for j in range(i))
    assert not set(range(seeds[0], seeds[0] + 32)) & set(range(
        seeds[0] + bs.REF_SEED_OFFSET, seeds[0] + bs.REF_SEED_OFFSET + 32))


def test_every_rule_asks_for_its_strategy_and_never_names_the_judge():
    for key, (label, make) in bs.METHODS.items():
        body = make(32)
        assert body["n"] == 32 and body["strategy"] in (
            "best_of_n", "nash", "particle_filtering", "soft_best_of_n"), key
        assert bs.JUDGE not in str(body) and label
    assert bs.METHODS["ens-min"][1](8)["reward"] == "ensemble[min]:relevance,sentiment"
    assert bs.METHODS["bon"][1](8)["reward"] == bs.A


def test_judge_win_counts_ties_half():
    assert bs.judge_win(0.5, [0.1, 0.5, 0.9, 0.2]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    with pytest.raises(ValueError):
        bs.judge_win(0.5, [])


def test_mean_ci_is_seeded_and_brackets_the_mean():
    values = [0.1, 0.4, 0.35, 0.8, 0.55, 0.2]
    m, lo, hi = bs.mean_ci(values)
    assert m == pytest.approx(sum(values) / 6) and lo < m < hi
    assert bs.mean_ci(values) == (m, lo, hi)  # same seed, same interval
    d, dlo, dhi = bs.paired_diff([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert d == pytest.approx(0.5) and dlo == pytest.approx(0.5) and dhi == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bs.paired_diff([1.0], [1.0, 2.0])


def _record(pid, judge, a, chosen, cands, kl_estimate=None):
    return {"prompt_id": pid, "a": a, "b": 0.0, "judge": judge, "chosen": chosen,
            "candidates_ab": cands, "latency_s": 2.0,
            "alignment": {"reward": a, "kl_bound": 2.0, "kl_estimate": kl_estimate,
                          "generated_tokens": 64}}


def test_summarise_one_setting():
    refs = {"p1": [0.2, 0.4], "p2": [0.9, 0.9]}
    # p1: the answer (candidate 1) is the best on both users; p2: candidate 0 is the worst
    recs = [_record("p1", 0.5, 0.7, 1, [[0.1, 0.7], [0.0, 1.0]], kl_estimate=1.0),
            _record("p2", 0.1, 0.3, 0, [[0.3, 0.6], [0.0, 1.0]])]
    s = bs.summarise(recs, refs)
    assert s["judge"][0] == pytest.approx(0.3)
    assert s["judge_win"][0] == pytest.approx(0.5)  # p1 beats both refs, p2 loses to both
    assert s["kl_estimate"] == 1.0 and s["win_rate_estimate"] is None  # absent, never 0
    assert s["generated_tokens"] == 64
    # distortion = Σ best / Σ achieved welfare = (1 + 1) / (1 + 0): p2's answer is the worst
    assert s["distortion"] is not None and s["distortion"][0] == pytest.approx(2.0)
    # without candidates (some rule returned none) no distortion is claimed
    assert bs.summarise([{**recs[0], "candidates_ab": None}], refs)["distortion"] is None


def test_reference_row_averages_each_prompt_first():
    base = bs.reference_row({"p": [0.0, 1.0], "q": [1.0]}, {"p": [0.0], "q": [0.0]},
                            {"p": [0.2, 0.4], "q": [0.9]})
    assert base["proxy_a"][0] == pytest.approx(0.75) and base["judge"][0] == pytest.approx(0.6)


def test_answer_record_keeps_the_chosen_candidate_and_drops_the_trace():
    resp = {"choices": [{"message": {"content": "b"}}],
            "alignment": {"reward": 1.0, "candidates": [{"text": "a", "chosen": False},
                                                        {"text": "b", "chosen": True}]}}
    rec = bs.answer_record(PromptItem("p", "q?", "helpful"), resp, 1.5)
    assert rec["chosen"] == 1 and rec["candidates"] == ["a", "b"] and rec["text"] == "b"
    assert "candidates" not in rec["alignment"] and rec["latency_s"] == 1.5


def test_paired_tables_against_single_proxy_and_by_kind():
    def setting(judges):
        return {"per_prompt": {"ids": ["h", "a"], "judge": judges, "judge_win": [0.5, 0.5],
                               "a": [0.0, 0.0]}}

    summary = {"bon@8": setting([0.9, 0.5]), "nash@8": setting([0.9, 0.9])}
    lines = bs.versus_single(summary, [8], ["bon", "nash"])
    assert len(lines) == 3 and "+0.200 [+0.000, +0.400]" in lines[2]  # Δ = (0 + 0.4) / 2
    kinds = bs.by_kind(summary, [8], ["bon", "nash"], {"h": "helpful", "a": "adversarial"})
    assert kinds[0] == "| rule | N | judge, adversarial prompts | judge, helpful prompts |"
    assert kinds[2].endswith("| 0.500 | 0.900 |") and kinds[3].endswith("| 0.900 | 0.900 |")
    assert bs.versus_single(summary, [8], ["nash"]) == ["(best_of_n on A was not run)"]
