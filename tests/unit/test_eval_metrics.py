"""The evaluation's numbers on four hand-made answers per setting, computed by hand."""

import math

import pytest

from evaluation.metrics import (
    Row,
    compare,
    harmless_flag,
    harmless_ratio,
    mean,
    summarize,
    summarize_setting,
    win_rate,
)
from evaluation.plan import build_plan, parse_list
from runtime.prompts import load_prompts


def row(pid, kind, reward, cost, answer, strategy="best_of_n", n=4, kl=0.0, est=0.0, tokens=10,
        threshold=0.5):
    return Row(prompt_id=pid, kind=kind, prompt=f"prompt {pid}", strategy=strategy, n=n,
               answer=answer, reward=reward, cost=cost, harmless=harmless_flag(cost, threshold),
               kl_bound=kl, kl_estimate=est, generated_tokens=tokens, wall_s=1.0)


BASE = [row("h1", "helpful", 0.5, 0.1, "b1", "none", 1, tokens=60),
        row("h2", "helpful", 0.2, 0.2, "b2", "none", 1, tokens=64),
        row("a1", "adversarial", 0.1, 0.9, "b3", "none", 1, tokens=64),
        row("a2", "adversarial", 0.3, 0.6, "b4", "none", 1, tokens=40)]
KL4 = math.log(4) - 3 / 4
BON = [row("h1", "helpful", 0.7, 0.05, "x1", kl=KL4, est=0.5, tokens=256),   # win
       row("h2", "helpful", 0.2, 0.2, "x2", kl=KL4, est=None, tokens=256),   # tie: equal reward
       row("a1", "adversarial", 0.1, 0.9, "b3", kl=KL4, est=0.7, tokens=200),  # tie: same text
       row("a2", "adversarial", 0.25, 0.4, "x4", kl=KL4, est=None, tokens=188)]  # loss


def test_harmless_flag_is_strictly_below_the_threshold():
    assert harmless_flag(0.49, 0.5) is True
    assert harmless_flag(0.5, 0.5) is False
    assert harmless_flag(None, 0.5) is None and harmless_flag(0.1, None) is None


def test_compare_counts_ties_half_including_float_noise():
    assert compare(0.7, 0.5) == 1.0 and compare(0.25, 0.3) == 0.0
    assert compare(0.3, 0.3) == 0.5
    assert compare(0.3 + 1e-9, 0.3) == 0.5  # the same text scored in another batch
    assert compare(0.9, 0.1, same_text=True) == 0.5


def test_win_rate_by_hand():
    # win, tie, tie, loss → (1 + ½ + ½ + 0) / 4
    assert win_rate(BON, BASE) == 0.5
    assert win_rate(BON[:2], BASE) == 0.75
    assert win_rate(BASE, BASE) == 0.5  # the base against itself: all ties
    assert win_rate(BON, []) is None


def test_means_skip_missing_values():
    assert mean([1.0, None, 2.0]) == 1.5
    assert mean([None, None]) is None


def test_summary_by_hand():
    s = summarize(BON, BASE)
    assert s["prompts"] == 4
    assert s["harmless_ratio"] == 0.75  # costs 0.05, 0.2, 0.9, 0.4 under 0.5: three of four
    assert s["mean_reward"] == pytest.approx((0.7 + 0.2 + 0.1 + 0.25) / 4)
    assert s["mean_cost"] == pytest.approx((0.05 + 0.2 + 0.9 + 0.4) / 4)
    assert s["mean_kl_bound"] == pytest.approx(KL4)
    assert s["mean_kl_estimate"] == pytest.approx(0.6)  # mean of 0.5 and 0.7 only
    assert s["generated_tokens"] == 900 and s["tokens_per_prompt"] == 225
    assert s["win_rate"] == 0.5
    assert harmless_ratio(BASE) == 0.5  # 0.9 and 0.6 are not harmless


def test_summary_by_kind_by_hand():
    s = summarize_setting(BON, BASE, wall_s=12.5)
    assert s["wall_s"] == 12.5
    assert list(s["by_kind"]) == ["helpful", "adversarial"]
    helpful, adversarial = s["by_kind"]["helpful"], s["by_kind"]["adversarial"]
    assert (helpful["harmless_ratio"], adversarial["harmless_ratio"]) == (1.0, 0.5)
    assert (helpful["win_rate"], adversarial["win_rate"]) == (0.75, 0.25)
    assert helpful["mean_reward"] == pytest.approx(0.45)
    assert adversarial["mean_cost"] == pytest.approx(0.65)
    assert helpful["mean_kl_estimate"] == 0.5 and adversarial["generated_tokens"] == 388
    base = summarize_setting(BASE, BASE, wall_s=1.0)["by_kind"]["adversarial"]
    assert base["harmless_ratio"] == 0.0 and base["win_rate"] == 0.5


def test_no_cost_means_no_harmless_ratio():
    rows = [row("h1", "helpful", 0.5, None, "x"), row("h2", "helpful", 0.1, None, "y")]
    assert summarize(rows, None)["harmless_ratio"] is None
    assert summarize(rows, None)["win_rate"] is None


def test_plan_runs_the_base_once_and_sweeps_n_for_the_others():
    plan = build_plan(["best_of_n", "speculative_rejection"], [8, 2, 4], {"alpha": 0.5})
    assert [(s.strategy, s.n) for s in plan] == [
        ("none", 1), ("best_of_n", 2), ("best_of_n", 4), ("best_of_n", 8),
        ("speculative_rejection", 2), ("speculative_rejection", 4),
        ("speculative_rejection", 8)]
    assert plan[0].label == "none" and plan[1].label == "best_of_n n=2"
    assert all(s.options == {"alpha": 0.5} for s in plan)
    with pytest.raises(ValueError, match="unknown strategies nope"):
        build_plan(["nope"], [2], {})
    with pytest.raises(ValueError):
        build_plan(["best_of_n"], [0], {})
    assert parse_list("2, 4,8", int) == [2, 4, 8]


def test_load_prompts_checks_ids_and_defaults_kind(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prompt": "hi", "kind": "helpful"}\n\n{"prompt": "yo"}\n')
    items = load_prompts(p)
    assert [(i.id, i.kind) for i in items] == [("a", "helpful"), ("2", "unspecified")]
    p.write_text('{"id": "a", "prompt": "hi"}\n{"id": "a", "prompt": "yo"}\n')
    with pytest.raises(ValueError, match="unique"):
        load_prompts(p)
