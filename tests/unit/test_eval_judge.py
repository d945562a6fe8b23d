"""`alignserve eval --judge` (evaluation/judge.py) on fakes, and the separation metric's bootstrap
interval (evaluation/separation.py).

A scripted runner gives hand-made answers whose proxy reward rises with n while a word-count
judge does not, so every judge number is checked by hand; then the in-process runner on the fake
engine, whose judge comes from the runtime's own registry.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics

import numpy as np
import pytest
from fakes import FakeEngine, WordReward

from decoding.context import DecodeContext
from decoding.kl import bon_kl_bound
from evaluation.cli import add_arguments, evaluate, main
from evaluation.judge import PLOT, parse_judges
from evaluation.runners import Answer, InProcessRunner, RunConfig
from evaluation.separation import bootstrap_bd, separation
from runtime.protocols import Runtime
from runtime.scorers import ScorerRegistry

PROMPTS = [{"id": f"p{i}", "prompt": f"prompt {i}", "kind": "helpful"} for i in range(4)]

# (strategy, n) → per prompt (answer, proxy reward): the proxy rises with n, while the judge
# (count of "ok" in the answer) rises from n=1 to n=2 and falls back at n=4
SCRIPT = {
    ("none", 1): [("ok x", 0.1), ("x", 0.2), ("ok", 0.0), ("x x", 0.1)],
    ("best_of_n", 2): [("ok ok", 0.3), ("ok x", 0.4), ("ok", 0.2), ("ok ok x", 0.3)],
    ("best_of_n", 4): [("x", 0.6), ("x y", 0.7), ("ok y", 0.5), ("x x y", 0.6)],
}


class Scripted:
    model_name = "scripted"

    async def answer(self, item, setting, seed=None) -> Answer:
        text, reward = SCRIPT[(setting.strategy, setting.n)][int(item.id[1:])]
        return Answer(text, reward, None, bon_kl_bound(setting.n), None, 4, 0.01)

    async def aclose(self) -> None:
        pass


def _registry() -> ScorerRegistry:
    return ScorerRegistry({"ok_count": lambda: WordReward("ok", "ok_count"),
                           "x_count": lambda: WordReward("x", "x_count"),
                           "good_count": WordReward}, None)


def args(tmp_path, *extra) -> argparse.Namespace:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--prompts", str(prompts), "--out", str(tmp_path / "out"), *extra])


# ------------------------------------------------------------------------------ the flags


def test_a_judge_equal_to_the_objective_is_refused_by_name():
    with pytest.raises(ValueError, match="'relevance' is the --reward scorer"):
        parse_judges(["relevance"], "relevance", None)
    with pytest.raises(ValueError, match="'-profanity' is the --cost scorer"):
        parse_judges(["sentiment", "-profanity"], "relevance", "profanity")
    with pytest.raises(ValueError, match="given twice"):
        parse_judges(["sentiment", "sentiment"], "relevance", None)
    for bad in ("ensemble:a,b", "calibrated:sentiment", "remote:rm", "-"):
        with pytest.raises(ValueError, match="--judge"):
            parse_judges([bad], "relevance", None)
    judges = parse_judges(["sentiment", "-profanity"], "relevance", None)
    assert [(j.label, j.name, j.sign) for j in judges] == [
        ("sentiment", "sentiment", 1.0), ("-profanity", "profanity", -1.0)]


def test_a_judge_inside_a_composite_objective_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="evaluation.judge"):
        (j,) = parse_judges(["length"], "ensemble:relevance,length", None)
    assert j.name == "length" and "partly in-sample" in caplog.text


def test_cli_refuses_judge_equal_to_reward_before_starting_anything(tmp_path, capsys):
    ns = args(tmp_path)
    rc = main(["--prompts", str(ns.prompts), "--out", str(tmp_path / "o"),
               "--reward", "relevance", "--judge", "sentiment", "--judge", "relevance"])
    assert rc == 2
    assert "--judge 'relevance' is the --reward scorer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    rc = main(["--prefill", "4", "--cost", "profanity", "--judge", "sentiment",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "not --prefill" in capsys.readouterr().err


# ------------------------------------------------------------------------------ end to end


async def test_judge_numbers_by_hand_and_the_figure(tmp_path):
    ns = args(tmp_path, "--strategies", "best_of_n", "--n", "2,4", "--reward", "good_count",
              "--judge", "ok_count", "--judge=-x_count")
    await evaluate(ns, runner=Scripted(), scorers=_registry())
    out = tmp_path / "out"
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["judges"] == ["ok_count", "-x_count"]
    none, bon2, bon4 = doc["strategies"]
    for e, texts in zip((none, bon2, bon4), SCRIPT.values()):
        assert [a["judges"]["ok_count"] for a in e["answers"]] == [
            float(t.split().count("ok")) for t, _ in texts]
        assert [a["judges"]["-x_count"] for a in e["answers"]] == [
            -float(t.split().count("x")) for t, _ in texts]
    # the proxy rises with n, the judge does not: 0.5 → 1.5 → 0.25
    assert [e["mean_reward"] for e in doc["strategies"]] == pytest.approx([0.1, 0.3, 0.6])
    assert [e["judges"]["ok_count"]["mean"] for e in doc["strategies"]] == pytest.approx(
        [0.5, 1.5, 0.25])
    assert bon4["judges"]["-x_count"]["mean"] == pytest.approx(-1.0)
    # judge win rate vs none: p0 ("x" vs "ok x") loss, p1, p2 and p3 ties (equal counts)
    assert bon4["judges"]["ok_count"]["win_rate"] == pytest.approx(1.5 / 4)
    assert bon4["win_rate"] == 1.0  # the proxy says every answer won
    for e in doc["strategies"]:
        for j in e["judges"].values():
            lo, hi = j["mean_ci"]
            assert lo < j["mean"] < hi or lo == j["mean"] == hi
        assert e["by_kind"]["helpful"]["judges"]["ok_count"]["mean"] == e["judges"][
            "ok_count"]["mean"]
    # the interval is the eval's cluster-robust t: 4 prompts, one answer each → plain t
    values = [1.0, 0.0, 0.0, 0.0]
    half = 3.182446305284263 * statistics.stdev(values) / 2
    assert bon4["judges"]["ok_count"]["mean_ci"] == pytest.approx([0.25 - half, 0.25 + half])
    report = (out / "report.md").read_text()
    assert "## Proxy vs judges" in report and "judge `ok_count` mean" in report
    assert "| best_of_n | 4 |" in report and "0.250 [" in report
    assert (out / PLOT).stat().st_size > 5000


async def test_no_judge_no_section_and_no_figure(tmp_path):
    await evaluate(args(tmp_path, "--strategies", "best_of_n", "--n", "2",
                        "--reward", "good_count"), runner=Scripted())
    out = tmp_path / "out"
    assert "Proxy vs judges" not in (out / "report.md").read_text()
    assert not (out / PLOT).exists()
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["judges"] is None and doc["strategies"][1]["judges"] == {}


async def test_in_process_judges_come_from_the_runtime_registry(tmp_path):
    engine = FakeEngine(seed=3, full_length=True)
    runtime = Runtime(engine=engine, scorers=ScorerRegistry({
        "good_count": WordReward, "bad_count": lambda: WordReward("bad", "bad_count")}, None),
        ctx=DecodeContext(engine), model_name="fake")
    runner = await InProcessRunner(runtime, RunConfig(max_tokens=6, reward="good_count")).start()
    ns = args(tmp_path, "--strategies", "best_of_n", "--n", "1,4", "--max-tokens", "6",
              "--reward", "good_count", "--judge", "bad_count")
    await evaluate(ns, runner=runner)
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    for e in doc["strategies"]:
        for a in e["answers"]:
            assert a["judges"] == {"bad_count": float(a["answer"].split().count("bad"))}
            assert a["reward"] == a["answer"].split().count("good")
    assert (tmp_path / "out" / PLOT).exists()


async def test_an_unknown_judge_fails_before_the_run(tmp_path):
    class Counting(Scripted):
        calls = 0

        async def answer(self, item, setting, seed=None):
            Counting.calls += 1
            return await super().answer(item, setting, seed)

    ns = args(tmp_path, "--strategies", "best_of_n", "--n", "2", "--reward", "good_count",
              "--judge", "no_such_judge")
    with pytest.raises(ValueError, match="no_such_judge"):
        await evaluate(ns, runner=Counting(), scorers=_registry())
    assert Counting.calls == 0


# ------------------------------------------------------------------ separation's interval


def test_separation_bootstrap_interval_is_seeded_and_contains_the_estimate():
    rng = np.random.default_rng(1)
    safe, harmful = rng.normal(size=(12, 6)), rng.normal(size=(12, 6)) + 1.5
    r = separation(safe, harmful, resamples=300, seed=7)
    lo, hi = r["bhattacharyya_distance_ci"]
    assert lo < r["bhattacharyya_distance"] < hi
    assert r["bootstrap"]["resamples"] == 300 and r["bootstrap"]["seed"] == 7
    assert bootstrap_bd(safe, harmful, 300, seed=7) == (lo, hi)  # seeded: reproducible
    assert bootstrap_bd(safe, harmful, 300, seed=8) != (lo, hi)
    # more prompts from the same clouds: a narrower interval
    big = separation(rng.normal(size=(60, 6)), rng.normal(size=(60, 6)) + 1.5,
                     resamples=300, seed=7)["bhattacharyya_distance_ci"]
    assert big[1] - big[0] < hi - lo
    assert separation(safe, harmful, resamples=0)["bhattacharyya_distance_ci"] is None
