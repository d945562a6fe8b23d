import asyncio
import math
from collections import Counter

import pytest
from fakes import Exploding, FakeEngine, FixedScores, WordReward

from decoding.context import DecodeContext
from decoding.kl import bon_kl_bound, bon_kl_estimate
from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES, soft_weights
from decoding.types import Sampling


def request(n=4, objective=None, **kw) -> DecodeRequest:
    return DecodeRequest(prompt_ids=[1, 2, 3], prompt_text="hello", sampling=Sampling(max_tokens=12),
                         n=n, objective=objective, **kw)


async def test_registry_has_the_core_strategies():
    assert {"none", "best_of_n", "soft_best_of_n"} <= set(STRATEGIES)
    assert not STRATEGIES["none"].traits.needs_objective
    assert STRATEGIES["best_of_n"].traits.needs_objective


async def test_best_of_n_returns_the_argmax_of_reward_minus_weighted_cost():
    engine = FakeEngine(seed=3)
    # rewards 1,5,4,2 ; costs 0,3,0.5,0 ; weight 2 -> scores 1,-1,3,2 -> index 2
    obj = Objective(reward=FixedScores([1, 5, 4, 2]), cost=FixedScores([0, 3, 0.5, 0]),
                    cost_weight=2.0)
    res = await STRATEGIES["best_of_n"].run(request(objective=obj, return_candidates=True),
                                            DecodeContext(engine))
    assert res.candidates is not None and len(res.candidates) == 4
    assert res.sample is res.candidates[2].sample
    assert (res.reward, res.cost) == (4, 0.5)
    assert [c.score for c in res.candidates] == [1, -1, 3, 2]
    assert res.generated_tokens == sum(len(c.sample.token_ids) for c in res.candidates)
    assert res.scored_candidates == 4
    assert res.kl_bound == pytest.approx(bon_kl_bound(4))
    assert res.kl_estimate == pytest.approx(bon_kl_estimate(4, res.sample.logprob))
    assert res.win_rate_bound == 0.8
    assert engine.calls[0][1] == 4  # one engine call with n = 4


async def test_best_of_n_with_a_real_looking_reward_picks_max():
    engine = FakeEngine(seed=7)
    res = await STRATEGIES["best_of_n"].run(
        request(n=8, objective=Objective(WordReward()), return_candidates=True),
        DecodeContext(engine))
    assert res.reward == max(c.reward for c in res.candidates)
    assert res.sample.text.split().count("good") == res.reward


async def test_none_scores_only_when_asked():
    engine = FakeEngine()
    plain = await STRATEGIES["none"].run(request(n=1), DecodeContext(engine))
    assert plain.reward is None and plain.kl_bound == 0 and plain.scored_candidates == 0
    scored = await STRATEGIES["none"].run(request(n=1, objective=Objective(WordReward())),
                                          DecodeContext(engine))
    assert scored.reward == scored.sample.text.split().count("good")


def test_soft_weights_are_a_stable_softmax():
    w = soft_weights([0.0, math.log(3.0)], 1.0)
    assert w == pytest.approx([0.25, 0.75])
    assert soft_weights([1000.0, 0.0], 0.01) == pytest.approx([1.0, 0.0])
    assert soft_weights([1.0, 2.0, 3.0], 1e6) == pytest.approx([1 / 3] * 3, rel=1e-5)


async def test_soft_best_of_n_draws_from_the_softmax():
    engine = FakeEngine()
    scores = [0.0, 1.0, 2.0]
    obj = Objective(FixedScores(scores))
    picks: Counter = Counter()
    trials = 3000
    for seed in range(trials):
        res = await STRATEGIES["soft_best_of_n"].run(
            request(n=3, objective=obj, return_candidates=True, seed=seed,
                    options=STRATEGIES["soft_best_of_n"].Options(selection_temperature=0.5)),
            DecodeContext(engine))
        picks[[c.sample for c in res.candidates].index(res.sample)] += 1
    expected = soft_weights(scores, 0.5)
    for i, p in enumerate(expected):
        assert picks[i] / trials == pytest.approx(p, abs=0.03)
    assert res.kl_bound == pytest.approx(math.log(3)) and res.kl_estimate is None


async def test_scorer_failure_propagates_and_leaves_no_engine_work():
    engine = FakeEngine()
    with pytest.raises(RuntimeError, match="scorer failed"):
        await STRATEGIES["best_of_n"].run(request(objective=Objective(Exploding())),
                                          DecodeContext(engine))
    assert engine.active == 0


async def test_cancelling_a_strategy_cancels_its_engine_request():
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    task = asyncio.create_task(STRATEGIES["best_of_n"].run(
        request(objective=Objective(WordReward())), DecodeContext(engine)))
    while engine.active == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.cancelled == 1 and engine.active == 0
