"""bench/common.py's compute accounting: engine tokens and the scorer's work per answer."""

import importlib.util
from pathlib import Path

from fakes import FakeEngine, WordReward

from decoding.context import DecodeContext
from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES
from decoding.types import Sampling

_PATH = Path(__file__).resolve().parents[2] / "bench" / "common.py"
_spec = importlib.util.spec_from_file_location("bench_common_compute", _PATH)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


async def test_speculative_rejection_counts_every_scored_partial_answer():
    spr = STRATEGIES["speculative_rejection"]
    req = DecodeRequest([1, 2], "p", Sampling(max_tokens=32, seed=1), n=8,
                        objective=Objective(WordReward()),
                        options=spr.Options(alpha=0.5, decision_tokens=4, growth=2.0))
    res = await spr.run(req, DecodeContext(FakeEngine(full_length=True)))
    got = common.compute_per_prompt([res, res])
    # 8 partials of 4 tokens, 4 of 12, 2 of 28, then the survivor whole
    assert got["scorer_calls_per_prompt"] == 8 + 4 + 2 + 1
    assert got["scored_tokens_per_prompt"] == 8 * 4 + 4 * 12 + 2 * 28 + 32
    assert got["generated_tokens_per_prompt"] == res.generated_tokens


def test_alignment_dicts_and_missing_fields():
    infos = [{"generated_tokens": 10, "scorer_calls": 4, "scored_tokens": 40},
             {"generated_tokens": 20, "scorer_calls": 2}]
    got = common.compute_per_prompt(infos)
    assert got["generated_tokens_per_prompt"] == 15 and got["scorer_calls_per_prompt"] == 3
    assert got["scored_tokens_per_prompt"] is None  # not reported by one: unknown, not 0
