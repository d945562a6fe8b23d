import asyncio

import pytest
from fakes import Exploding, FakeEngine, WordReward

from decoding.kl import selection_kl_bound
from decoding.protocols import DecodeContext, DecodeRequest, Objective, Sample, Sampling
from decoding.strategies import STRATEGIES

SPR = STRATEGIES["speculative_rejection"]
PROMPT = [101, 102, 103]


def request(n, alpha, decision, growth=2.0, max_tokens=64, objective=None, **kw):
    return DecodeRequest(PROMPT, "p", Sampling(max_tokens=max_tokens), n=n,
                         objective=objective or Objective(WordReward()), return_candidates=True,
                         options={"alpha": alpha, "decision_tokens": decision, "growth": growth},
                         **kw)


@pytest.mark.parametrize("n,alpha,decision,rejected,generated,rounds", [
    # 16 ×4 → keep 8 → +8 → keep 4 → +16 → keep 2 → +32 → keep 1 → lone survivor runs to 64
    (16, 0.5, 4, [8, 4, 2, 1], 16 * 4 + 8 * 8 + 4 * 16 + 2 * 32 + 4, 5),
    # 8 ×8 → keep 2 → +16 → keep 1 (never 0) → +40
    (8, 0.75, 8, [6, 1], 8 * 8 + 2 * 16 + 40, 3),
    # α = 0 keeps everyone: exactly best-of-n's compute
    (4, 0.0, 16, [0, 0], 4 * 64, 3),
    # first decision point beyond the budget: plain best-of-n in one round
    (4, 0.5, 100, [], 4 * 64, 1),
])
async def test_rounds_and_survivor_counts(n, alpha, decision, rejected, generated, rounds):
    engine = FakeEngine(full_length=True)
    res = await SPR.run(request(n, alpha, decision), DecodeContext(engine))
    assert res.extra == {"rounds": rounds, "rejected": rejected}
    assert res.generated_tokens == generated
    assert len(res.sample.token_ids) == 64 and res.sample.finish_reason == "length"
    assert res.kl_bound == pytest.approx(selection_kl_bound(n)) and res.kl_estimate is None
    assert engine.active == 0


async def test_survivors_continue_from_their_exact_ids():
    engine = FakeEngine(full_length=True, seed=5)
    res = await SPR.run(request(8, 0.5, 4), DecodeContext(engine))
    first, *continuations = engine.calls
    assert first[0] == PROMPT and first[1] == 8
    finals = [c.sample.token_ids for c in res.candidates]
    for prompt_ids, n, sampling in continuations:
        assert n == 1 and prompt_ids[:3] == PROMPT
        prefix = prompt_ids[3:]
        assert any(f[: len(prefix)] == prefix for f in finals)  # an exact prefix, nothing lost
        assert len(prefix) + sampling.max_tokens <= 64
    # the winner is the best complete candidate, and its text matches its ids
    complete = [c for c in res.candidates if len(c.sample.token_ids) == 64]
    assert res.reward == max(c.reward for c in complete)
    assert res.sample.text == engine.tokenizer.decode(res.sample.token_ids)


class ScriptedEngine(FakeEngine):
    """First call: two finished 'bad' answers and two unfinished 'good' ones."""

    async def generate(self, prompt_ids, n, sampling):
        out = await super().generate(prompt_ids, n, sampling)
        if len(self.calls) == 1:
            return [Sample([1], "bad", [-1.0], "stop"), Sample([1], "bad", [-1.0], "stop"),
                    Sample([0] * 4, "good good good good", [-1.0] * 4, "length"),
                    Sample([0] * 4, "good good good good", [-1.0] * 4, "length")]
        k = sampling.max_tokens
        return [Sample([0] * k, " good" * k, [-1.0] * k, "length") for _ in out]


async def test_finished_sequences_compete_and_can_be_rejected():
    engine = ScriptedEngine()
    res = await SPR.run(request(4, 0.5, 4, max_tokens=16), DecodeContext(engine))
    assert res.extra["rejected"][0] == 2  # both finished 'bad' answers went first
    assert res.sample.text.startswith("good") and res.reward == 16
    stopped = [c for c in res.candidates if c.sample.finish_reason == "stop"]
    assert len(stopped) == 2 and all(c.reward == 0 for c in stopped)


async def test_scorer_error_leaves_nothing_running():
    engine = FakeEngine(full_length=True)
    with pytest.raises(RuntimeError):
        await SPR.run(request(8, 0.5, 4, objective=Objective(Exploding())), DecodeContext(engine))
    assert engine.active == 0


class GatedAfterFirst(FakeEngine):
    """Round one runs; every continuation waits on the gate (a client that leaves mid-round)."""

    async def generate(self, prompt_ids, n, sampling):
        if self.calls:
            self.gate = self.gate or asyncio.Event()
        return await super().generate(prompt_ids, n, sampling)


async def test_cancel_mid_round_aborts_every_live_survivor():
    engine = GatedAfterFirst(full_length=True)
    task = asyncio.create_task(SPR.run(request(8, 0.5, 4), DecodeContext(engine)))
    while engine.active < 4:  # 8 → keep 4 survivors, all blocked in round two
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.cancelled == 4 and engine.active == 0


async def test_one_failing_continuation_cancels_its_siblings():
    class FailSecond(GatedAfterFirst):
        async def generate(self, prompt_ids, n, sampling):
            if len(self.calls) == 3:
                self.calls.append((prompt_ids, n, sampling))
                raise RuntimeError("engine error")
            return await super().generate(prompt_ids, n, sampling)

    engine = FailSecond(full_length=True)
    with pytest.raises(RuntimeError, match="engine error"):
        await SPR.run(request(8, 0.5, 4), DecodeContext(engine))
    assert engine.active == 0 and engine.cancelled == 3  # the other three survivors
