"""The Nash (maximal-lottery) rule: the LP, the preference matrix, the strategy, the API."""

import math

import numpy as np
import pytest
from fakes import Exploding, FakeEngine, FixedScores, sse_events, streamed_text

from decoding.context import DecodeContext
from decoding.nash import (
    condorcet_winner,
    distortion,
    distortion_terms,
    maximal_lottery,
    preference_matrix,
    welfare,
)
from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES
from decoding.types import Sampling
from runtime import ensemble

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "say something good"}],
        "max_tokens": 8}


def test_rock_paper_scissors_gives_the_uniform_lottery():
    # rock beats scissors, scissors beat paper, paper beats rock
    p = np.array([[0.5, 0.0, 1.0],
                  [1.0, 0.5, 0.0],
                  [0.0, 1.0, 0.5]])
    assert maximal_lottery(p) == pytest.approx([1 / 3] * 3, abs=1e-9)
    assert condorcet_winner(p) is None


def test_a_condorcet_winner_takes_the_whole_lottery():
    p = np.array([[0.5, 0.6, 0.55, 0.9],
                  [0.4, 0.5, 0.8, 0.1],   # 1, 2, 3 form a cycle below candidate 0
                  [0.45, 0.2, 0.5, 0.7],
                  [0.1, 0.9, 0.3, 0.5]])
    assert condorcet_winner(p) == 0
    assert maximal_lottery(p) == pytest.approx([1, 0, 0, 0], abs=1e-9)


def test_the_lottery_is_unbeaten_on_random_tournaments():
    rng = np.random.default_rng(0)
    for n in (2, 5, 9):
        upper = rng.uniform(size=(n, n))
        p = np.triu(upper, 1) + np.tril(1 - upper.T, -1) + 0.5 * np.eye(n)
        q = maximal_lottery(p)
        assert q.min() >= 0 and q.sum() == pytest.approx(1)
        assert (q @ (p - p.T) >= -1e-9).all()  # no candidate beats the lottery on average


def test_preference_matrix_of_bradley_terry_users():
    u = [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    p = preference_matrix(u, temperature=0.5)
    s = 1 / (1 + math.exp(-2.0))  # σ(1/0.5)
    assert p[1, 0] == pytest.approx((2 * s + (1 - s)) / 3)
    assert np.allclose(p + p.T, 1) and np.allclose(np.diag(p), 0.5)
    hard = preference_matrix(u, temperature=0.0)  # majority: 2 of 3 prefer candidate 1
    assert hard[1, 0] == pytest.approx(2 / 3)
    weighted = preference_matrix(u, temperature=0.0, weights=[1.0, 4.0, 1.0])
    assert weighted[0, 1] == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        preference_matrix(u, 0.1, weights=[1.0, -1.0, 1.0])


def request(n, objective, **kw):
    return DecodeRequest(prompt_ids=[1, 2, 3], prompt_text="hello",
                         sampling=Sampling(max_tokens=12), n=n, objective=objective, **kw)


def panel(*rows, agg="mean"):
    """An ensemble over FixedScores users (built as the registry would)."""
    names = [f"u{i}" for i in range(len(rows))]
    by_name = {name: FixedScores(row, name) for name, row in zip(names, rows)}
    prefix = "ensemble" if agg == "mean" else f"ensemble[{agg}]"
    return ensemble.load(f"{prefix}:" + ",".join(names), by_name.__getitem__)


async def test_one_user_makes_nash_best_of_n():
    obj = Objective(FixedScores([0.2, 0.7, 0.1, 0.4]))
    nash = await STRATEGIES["nash"].run(request(4, obj, seed=3), DecodeContext(FakeEngine(seed=8)))
    bon = await STRATEGIES["best_of_n"].run(request(4, obj), DecodeContext(FakeEngine(seed=8)))
    assert nash.sample.text == bon.sample.text and nash.reward == 0.7
    assert nash.extra["condorcet_winner"] == 1 == nash.extra["chosen_index"]
    assert nash.extra["lottery"] == [0, 1, 0, 0]
    assert nash.kl_bound == pytest.approx(math.log(4)) and nash.kl_estimate is None
    assert nash.win_rate_bound == pytest.approx(4 / 5)
    assert nash.extra["win_rate_estimate"] == pytest.approx(4 / 5)


async def test_a_cyclic_panel_draws_from_the_uniform_lottery_with_the_seed():
    # three users, rankings A>B>C, B>C>A, C>A>B: every pairwise majority is 2 to 1, a cycle
    users = panel([3, 2, 1], [1, 3, 2], [2, 1, 3])
    obj = Objective(users)
    drawn = set()
    for seed in range(12):
        res = await STRATEGIES["nash"].run(
            request(3, obj, seed=seed, options=STRATEGIES["nash"].Options(user_temperature=0)),
            DecodeContext(FakeEngine(seed=4)))
        assert res.extra["lottery"] == pytest.approx([1 / 3] * 3, abs=1e-6)
        assert res.extra["condorcet_winner"] is None
        assert res.extra["users"] == ["u0", "u1", "u2"]
        i = res.extra["chosen_index"]
        assert res.extra["user_utilities"] == {"u0": [3, 2, 1][i], "u1": [1, 3, 2][i],
                                               "u2": [2, 1, 3][i]}
        assert res.reward == pytest.approx(0.5)  # every candidate: mean quantile ½
        drawn.add(i)
    assert drawn == {0, 1, 2}
    again = await STRATEGIES["nash"].run(request(3, obj, seed=7), DecodeContext(FakeEngine(seed=4)))
    once = await STRATEGIES["nash"].run(request(3, obj, seed=7), DecodeContext(FakeEngine(seed=4)))
    assert again.extra["chosen_index"] == once.extra["chosen_index"]


async def test_a_cost_is_one_more_user_weighted_by_cost_weight():
    # reward prefers 0 > 1 > 2, the cost (a user with −cost) prefers 2 > 1 > 0
    reward, cost = FixedScores([3.0, 2.0, 1.0], "r"), FixedScores([3.0, 2.0, 1.0], "c")
    light = await STRATEGIES["nash"].run(
        request(3, Objective(reward, cost, cost_weight=0.5), return_candidates=True),
        DecodeContext(FakeEngine(seed=1)))
    assert light.extra["users"] == ["r", "-c"] and light.extra["chosen_index"] == 0
    assert light.extra["user_utilities"] == {"r": 3.0, "-c": -3.0}
    assert (light.reward, light.cost) == (3.0, 3.0)
    heavy = await STRATEGIES["nash"].run(request(3, Objective(reward, cost, cost_weight=2.0)),
                                         DecodeContext(FakeEngine(seed=1)))
    assert heavy.extra["chosen_index"] == 2 and heavy.extra["condorcet_winner"] == 2


async def test_nash_reports_every_candidate_and_counts_tokens():
    res = await STRATEGIES["nash"].run(
        request(4, Objective(panel([1, 2, 3, 4], [4, 3, 2, 1])), return_candidates=True),
        DecodeContext(FakeEngine(seed=2)))
    assert len(res.candidates) == 4 and res.scored_candidates == 4
    assert res.generated_tokens == sum(len(c.sample.token_ids) for c in res.candidates)
    assert sum(res.extra["lottery"]) == pytest.approx(1)
    assert res.extra["scorer_calls"] == 2 * 4  # two users, four candidates each
    assert res.extra["scored_tokens"] == 2 * res.generated_tokens


async def test_api_nash_with_a_panel(client):
    req = {**CHAT, "alignment": {"strategy": "nash", "n": 5, "user_temperature": 0.05,
                                 "reward": "ensemble:good_count,-bad_count"}, "seed": 1}
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    a = r.json()["alignment"]
    assert a["strategy"] == "nash" and len(a["lottery"]) == 5
    assert a["users"] == ["good_count", "-bad_count"]
    assert set(a["user_utilities"]) == {"good_count", "-bad_count"}
    assert a["kl_bound"] == pytest.approx(math.log(5)) and a["kl_estimate"] is None
    assert 0 < a["win_rate_estimate"] < 1


async def test_api_nash_streams_its_answer_with_the_alignment_block(client):
    req = {**CHAT, "stream": True, "alignment": {"strategy": "nash", "n": 3,
                                                 "reward": "ensemble:good_count,-bad_count"}}
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200
    events = sse_events(r.text)
    text = streamed_text(events)
    final = [e for e in events if e.get("alignment")]
    assert text and final and len(final[-1]["alignment"]["lottery"]) == 3


async def test_api_refuses_a_nash_option_out_of_bounds(client):
    req = {**CHAT, "alignment": {"strategy": "nash", "user_temperature": -1}}
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 400 and "user_temperature" in r.json()["error"]["param"]


def test_welfare_normalises_each_user_and_indifferent_users_count_fully():
    assert welfare([[0.0, 1.0, 2.0], [50.0, 50.0, 50.0]]) == pytest.approx([0.5, 0.75, 1.0])
    assert welfare([[0.0, 10.0], [1.0, 0.0]]) == pytest.approx([0.5, 0.5])


def test_distortion_of_a_rule_that_serves_one_user_of_two():
    # two users with opposite tastes and a compromise candidate 2 that both rank second
    u = [[1.0, 0.0, 0.8], [0.0, 1.0, 0.8]]
    assert distortion_terms(u, [1, 0, 0]) == pytest.approx((0.8, 0.5))  # one user's favourite
    assert distortion_terms(u, [0, 0, 1]) == pytest.approx((0.8, 0.8))  # the compromise
    ratio, lo, hi = distortion([(0.8, 0.5)] * 3 + [(0.8, 0.8)])
    assert ratio == pytest.approx(3.2 / 2.3) and 1.0 <= lo <= ratio <= hi <= 1.6
    assert distortion([(1.0, 0.0)])[0] == math.inf
    with pytest.raises(ValueError):
        distortion_terms(u, [0.5, 0.2, 0.2])


async def test_nash_reports_the_panels_welfare():
    res = await STRATEGIES["nash"].run(
        request(3, Objective(panel([1.0, 0.0, 0.8], [0.0, 1.0, 0.8])), seed=0),
        DecodeContext(FakeEngine(seed=2)))
    # the compromise (candidate 2) has the best welfare, .8; ordinally the two users tie
    # every pair (each prefers a different extreme), so no Condorcet winner
    w, q, i = res.extra["panel_welfare"], res.extra["lottery"], res.extra["chosen_index"]
    welfare_of = [0.5, 0.5, 0.8]
    assert res.extra["condorcet_winner"] is None
    assert w == pytest.approx({"answer": welfare_of[i], "best": 0.8,
                               "expected": sum(a * b for a, b in zip(q, welfare_of))})


async def test_a_failing_user_fails_nash_named():
    users = ensemble.load("ensemble:ok,exploding",
                          {"ok": FixedScores([1.0, 2.0]), "exploding": Exploding()}.__getitem__)
    with pytest.raises(RuntimeError, match="scorer failed") as e:
        await STRATEGIES["nash"].run(request(2, Objective(users)), DecodeContext(FakeEngine()))
    assert "raised by nash user exploding" in e.value.__notes__
