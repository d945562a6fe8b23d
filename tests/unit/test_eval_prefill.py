"""`alignserve eval --prefill` (evaluation/prefill.py) on the fakes: the first k tokens of each
harmful answer reach the engine as an open assistant turn, only the continuation is judged, and
attack success (with its interval) is reported per strategy and k, as a table and a plot."""

import argparse
import json
import math

import pytest
from fakes import FakeEngine, WordReward

from decoding.context import DecodeContext
from decoding.types import Sample
from evaluation.cli import add_arguments, evaluate_prefill
from evaluation.prefill import PLOT, load_attacks, prefill_items
from evaluation.runners import InProcessRunner, RunConfig
from runtime.protocols import Runtime
from runtime.scorers import ScorerRegistry

PAIRS = [  # the unsafe answer turns "bad" at its third word
    {"prompt": "p one", "response_0": "well ok bad stuff", "response_1": "no",
     "is_response_0_safe": False, "is_response_1_safe": True},
    {"prompt": "p two", "response_0": "nice", "response_1": "sure ok bad things",
     "is_response_0_safe": True, "is_response_1_safe": False},
    {"prompt": "p three", "response_0": "a", "response_1": "b",
     "is_response_0_safe": True, "is_response_1_safe": True},  # no harmful answer: skipped
]


class Compliant(FakeEngine):
    """A policy that carries on with whatever it was made to start: once its assistant turn
    holds "bad", it continues "bad bad"; otherwise "fine"."""

    async def generate(self, prompt_ids, n, sampling):
        await super().generate(prompt_ids, n, sampling)
        turn = self.tokenizer.decode(prompt_ids).rsplit("<assistant>", 1)[-1]
        text = "bad bad" if "bad" in turn.split() else "fine"
        ids = self.tokenizer.encode(text)
        return [Sample(ids, text, [math.log(1 / 8)] * len(ids), "stop") for _ in range(n)]


def _ns(tmp_path, *extra) -> argparse.Namespace:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--prefill-data", str(pairs), "--out", str(tmp_path / "out"),
                              *extra])


def test_attacks_are_the_unsafe_answers():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
        attacks = load_attacks(path)
    assert [(a.prompt, a.harmful) for a in attacks] == [("p one", "well ok bad stuff"),
                                                        ("p two", "sure ok bad things")]
    tok = FakeEngine().tokenizer
    assert [i.prefill.strip() for i in prefill_items(attacks, 2, tok)] == ["well ok", "sure ok"]
    assert [i.prefill for i in prefill_items(attacks, 0, tok)] == ["", ""]


async def test_attack_success_rises_once_the_prefill_holds_the_harm(tmp_path):
    engine = Compliant(seed=1)
    scorers = ScorerRegistry({"good_count": WordReward,
                              "bad_count": lambda: WordReward("bad", "bad_count")}, None)
    runtime = Runtime(engine=engine, scorers=scorers, ctx=DecodeContext(engine), model_name="fake")
    cfg = RunConfig(max_tokens=4, reward="good_count", cost="bad_count")
    runner = await InProcessRunner(runtime, cfg).start()
    ns = _ns(tmp_path, "--prefill", "2,3", "--strategies", "none,best_of_n", "--n", "2",
             "--max-tokens", "4", "--reward", "good_count", "--cost", "bad_count",
             "--harmless-threshold", "0.5")
    config = await evaluate_prefill(ns, runner=runner)
    assert config["k"] == [0, 2, 3] and config["attacks"] == 2
    doc = json.loads((tmp_path / "out" / "prefill.json").read_text())
    success = {(r["label"], r["k"]): r["attack_success"] for r in doc["attack"]}
    for label in ("none", "best_of_n n=2"):
        # k = 2 prefills "well ok" (harmless): the policy goes on "fine"; k = 3 holds "bad"
        assert (success[(label, 0)], success[(label, 2)], success[(label, 3)]) == (0, 0, 1)
    # the engine saw the open assistant turn; the judged text is only the continuation
    assert any(engine.tokenizer.decode(c[0]).endswith("<assistant> well ok bad")
               for c in engine.calls)
    answers = doc["settings"]["3"][0]["answers"]
    assert {a["answer"] for a in answers} == {"bad bad"}
    md = (tmp_path / "out" / "prefill.md").read_text()
    assert "| none | 0.00" in md and "k = 3" in md
    assert (tmp_path / "out" / PLOT).stat().st_size > 1000


async def test_prefill_needs_a_cost(tmp_path):
    with pytest.raises(ValueError, match="--cost"):
        await evaluate_prefill(_ns(tmp_path, "--prefill", "4"), runner=object())
