"""`alignserve eval --panel`: distortion on hand-made numbers (decoding/nash.py's functions as the
eval uses them, evaluation/panel.py, metrics), the report's column and JSON, and both runners
against the fakes."""

import argparse
import json

import httpx
import pytest
from fakes import FakeEngine, WordReward, make_app
from test_eval_report import args as eval_args

from decoding.context import DecodeContext
from decoding.nash import distortion, distortion_terms
from evaluation.cli import evaluate
from evaluation.metrics import Row, panel_distortion
from evaluation.panel import Member, answer_terms, candidate_set, parse_panel
from evaluation.report import markdown
from evaluation.runners import Answer, HttpRunner, InProcessRunner, RunConfig
from runtime.protocols import Runtime
from runtime.scorers import ScorerRegistry

PROMPTS = [{"id": f"p{i}", "prompt": f"prompt {i}", "kind": "helpful"} for i in range(3)]


def args(tmp_path, *extra) -> argparse.Namespace:
    return eval_args(tmp_path, *extra, prompts_rows=PROMPTS)


# ------------------------------------------------------------------ by hand


def test_distortion_terms_by_hand():
    # user 1: utilities 0, 1, 2 → normalised 0, ½, 1; user 2: 0, 1, 4 → 0, ¼, 1
    # welfare (mean over users): 0, 3/8, 1. The best candidate's is 1.
    assert distortion_terms([[0, 1, 2], [0, 1, 4]], [0, 1, 0]) == pytest.approx((1.0, 0.375))
    assert distortion_terms([[0, 1, 2], [0, 1, 4]], [0, 0, 1]) == pytest.approx((1.0, 1.0))
    # opposed users: every candidate has welfare ½, whatever is returned: distortion 1
    assert distortion_terms([[1, 0, 0.5], [0, 1, 0.5]], [1, 0, 0]) == pytest.approx((0.5, 0.5))
    # a user indifferent among all candidates counts 1 everywhere
    assert distortion_terms([[5, 5], [0, 1]], [1, 0]) == pytest.approx((1.0, 0.5))


def test_distortion_over_prompts_is_a_ratio_of_sums_with_an_interval():
    terms = [(1.0, 0.375), (1.0, 1.0), (0.5, 0.5)]
    d, lo, hi = distortion(terms)
    assert d == pytest.approx(2.5 / 1.875)
    assert 1.0 <= lo <= d <= hi <= 1.0 / 0.375  # each bootstrap ratio lies between the extremes
    assert distortion([(1.0, 0.0)])[0] == float("inf")  # the worst candidate for every user


async def test_answer_terms_use_the_members_signs_and_add_a_missing_answer():
    members = parse_panel("good,-bad")
    assert members == [Member("good", "good", 1.0), Member("-bad", "bad", -1.0)]
    pool, chosen = candidate_set(["x", "y"], "z", str)
    assert pool == ["x", "y", "z"] and chosen == 2
    scores = {"good": {"x": 2, "y": 1, "z": 0}, "bad": {"x": 0, "y": 1, "z": 1}}

    class S:
        def __init__(self, name):
            self.name = name

    async def score(s):
        return [float(scores[s.name][t]) for t in pool]

    # good: 2,1,0 → 1,½,0; −bad: 0,−1,−1 → 1,0,0: welfare 1, ¼, 0
    best, achieved = await answer_terms(members, [S("good"), S("bad")], chosen, score)
    assert (best, achieved) == pytest.approx((1.0, 0.0))
    assert candidate_set(["x", "y", "y"], "y", str) == (["x", "y", "y"], 1)


@pytest.mark.parametrize("text", ["good", "good,good", "ensemble:a,b", "remote:rm,good", "-,x"])
def test_bad_panels_are_refused(text):
    with pytest.raises(ValueError, match="--panel"):
        parse_panel(text)


def _row(prompt, best, achieved, k=0):
    return Row(prompt, "helpful", "p", "best_of_n", 4, "a", 1.0, None, None, 0.0, None, 1, 0.1,
               sample=k, panel_best=best, panel_achieved=achieved)


def test_metrics_sum_each_prompts_answers_before_the_ratio():
    rows = [_row("a", 1.0, 0.5, 0), _row("a", 1.0, 1.0, 1), _row("b", 0.8, 0.8)]
    d, ci = panel_distortion(rows)
    assert d == pytest.approx(2.8 / 2.3)
    assert ci is not None and ci[0] <= d <= ci[1]
    assert panel_distortion([_row("a", None, None)]) == (None, None)


def test_report_has_the_distortion_column_only_with_a_panel():
    entry = {"strategy": "best_of_n", "n": 4, "label": "best_of_n n=4", "prompts": 2,
             "harmless_ratio": None, "mean_reward": 1.0, "mean_cost": None,
             "mean_kl_bound": 1.0, "mean_kl_estimate": None, "tokens_per_prompt": 8,
             "win_rate": 0.7, "wall_s": 1.0, "distortion": 1.25, "distortion_ci": [1.1, 1.4],
             "by_kind": {}}
    with_panel = markdown({"panel": ["good", "-bad"]}, [entry])
    assert "distortion (panel) |" in with_panel and "1.250 [1.10, 1.40] |" in with_panel
    assert "Panel (one user each" in with_panel and "good, -bad" in with_panel
    without = markdown({}, [{**entry, "distortion": None, "distortion_ci": None}])
    assert "distortion" not in without


# ------------------------------------------------------------------ the eval, end to end


class Scripted:
    """Hand-made answers with hand-made panel terms: best_of_n on p0..p2."""

    model_name = "scripted"
    TERMS = {"p0": (1.0, 0.5), "p1": (1.0, 1.0), "p2": (0.9, 0.6)}

    async def answer(self, item, setting, seed=None) -> Answer:
        terms = (1.0, 1.0) if setting.strategy == "none" else self.TERMS[item.id]
        return Answer("a", 1.0, None, 0.0, None, 4, 0.01, terms)

    async def aclose(self) -> None:
        pass


async def test_eval_writes_the_distortion_to_json_and_report(tmp_path):
    ns = args(tmp_path, "--strategies", "best_of_n", "--n", "4", "--panel", "good,-bad")
    await evaluate(ns, runner=Scripted())
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["config"]["panel"] == ["good", "-bad"]
    none, bon = doc["strategies"]
    assert none["distortion"] == 1.0 and none["distortion_ci"] == [1.0, 1.0]
    assert bon["distortion"] == pytest.approx(2.9 / 2.1)
    assert bon["by_kind"]["helpful"]["distortion"] == pytest.approx(2.9 / 2.1)
    assert [a["panel_best"] for a in bon["answers"]] == [1.0, 1.0, 0.9]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "distortion (panel)" in report and f"{2.9 / 2.1:.3f}" in report


def _registry():
    return ScorerRegistry({"good_count": WordReward,
                           "bad_count": lambda: WordReward("bad", "bad_count")}, None)


PANEL = tuple(parse_panel("good_count,-bad_count"))


async def test_in_process_runner_measures_each_strategy_over_its_candidates(tmp_path):
    engine = FakeEngine(seed=2, full_length=True)
    runtime = Runtime(engine=engine, scorers=_registry(), ctx=DecodeContext(engine),
                      model_name="fake")
    cfg = RunConfig(max_tokens=6, reward="good_count", panel=PANEL)
    runner = await InProcessRunner(runtime, cfg).start()
    ns = args(tmp_path, "--strategies", "best_of_n,particle_filtering,blockwise_cd", "--n", "4",
              "--max-tokens", "6", "--reward", "good_count",
              "--panel", "good_count,-bad_count")
    await evaluate(ns, runner=runner)
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    by = {e["strategy"]: e for e in doc["strategies"]}
    assert by["none"]["distortion"] == 1.0  # one candidate: the answer is the best there is
    for name in ("best_of_n", "particle_filtering"):
        d, ci = by[name]["distortion"], by[name]["distortion_ci"]
        assert d >= 1.0 and ci[0] <= d <= ci[1]
        for a in by[name]["answers"]:
            assert 0.0 <= a["panel_achieved"] <= a["panel_best"] <= 1.0
    # blockwise CD keeps no candidate answers: not measured, shown as –
    assert by["blockwise_cd"]["distortion"] is None
    assert all(a["panel_best"] is None for a in by["blockwise_cd"]["answers"])


async def test_http_runner_asks_for_candidates_and_scores_them_here(tmp_path):
    app = make_app(FakeEngine(seed=4, full_length=True))
    seen = []

    async def record(request):
        if request.method == "POST":
            seen.append(json.loads(request.content))

    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                               event_hooks={"request": [record]})
    cfg = RunConfig(max_tokens=6, reward="good_count", panel=PANEL)
    runner = await HttpRunner("http://test", cfg, client=client,
                              panel_scorers=_registry()).start()
    ns = args(tmp_path, "--strategies", "best_of_n", "--n", "3", "--max-tokens", "6",
              "--reward", "good_count", "--panel", "good_count,-bad_count",
              "--server", "http://test")
    await evaluate(ns, runner=runner)
    assert seen and all(b["alignment"]["return_candidates"] for b in seen)
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    none, bon = doc["strategies"]
    assert none["distortion"] == 1.0 and bon["distortion"] >= 1.0
    for a in bon["answers"]:
        assert 0.0 <= a["panel_achieved"] <= a["panel_best"] <= 1.0
