"""Reward ensembles, calibrated rewards and the win-rate estimate (decoding/calibration.py,
runtime/ensemble.py, the `ensemble:`/`calibrated:` names of the scorer registry)."""

import threading

import pytest
from fakes import Exploding, FakeEngine, FakeFudgeHead, FixedScores

from decoding.calibration import aggregate, loo_quantiles, win_rate
from decoding.context import DecodeContext
from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES
from decoding.types import Sampling
from runtime import ensemble
from runtime.remote_scorer import UpstreamUnavailable
from runtime.scorers import ScorerRegistry, UnknownScorer

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "say something good"}],
        "max_tokens": 8}


def registry(**extra) -> ScorerRegistry:
    factories = {"a": lambda: FixedScores([1.0, 5.0, 3.0], "a"),
                 "b": lambda: FixedScores([-100.0, 0.0, 900.0], "b"),  # another scale
                 "c": lambda: FixedScores([0.2, 0.1, 0.3], "c"),
                 "boom": Exploding, **extra}
    return ScorerRegistry(factories, None)


# ---- calibration ----------------------------------------------------------------------------


def test_loo_quantiles_halve_ties_and_leave_the_candidate_out():
    assert loo_quantiles([1, 2, 2, 3]) == [0.0, 0.5, 0.5, 1.0]
    assert loo_quantiles([7, 7, 7]) == [0.5, 0.5, 0.5]
    assert loo_quantiles([3.0]) == [0.5]
    # invariant to any increasing transform: the point of calibrating
    assert loo_quantiles([0.1, 0.9, 0.5]) == loo_quantiles([-5.0, 1e6, 2.0])
    with pytest.raises(ValueError):
        loo_quantiles([1.0, float("nan")])


def test_aggregations_on_hand_made_scores():
    rows = [[0.0, 1.0, 0.5], [1.0, 1.0, 0.0], [0.5, 1.0, 0.0]]  # [members, candidates]
    assert aggregate(rows, "mean") == pytest.approx([0.5, 1.0, 1 / 6])
    assert aggregate(rows, "median") == [0.5, 1.0, 0.0]
    assert aggregate(rows, "min") == [0.0, 1.0, 0.0]
    # population std (ddof 0) over members: column 0 (0, 1, .5) -> sqrt(1/6); column 2
    # (.5, 0, 0) -> sqrt(1/18)
    assert aggregate(rows, "mean_minus_std", k=2.0) == pytest.approx(
        [0.5 - 2 * (1 / 6) ** 0.5, 1.0, 1 / 6 - 2 * (1 / 18) ** 0.5])
    with pytest.raises(ValueError):
        aggregate(rows, "max")


def test_win_rate_of_the_argmax_is_n_over_n_plus_1_and_ties_lower_it():
    wr = win_rate([0.1, 0.4, 0.3, 0.2], 1)
    assert wr.estimate == pytest.approx(4 / 5) and wr.beaten == 1.0
    assert 0.39 < wr.low < wr.estimate < wr.high < 1.0  # Beta(4, 1): 0.025^(1/4) = 0.398
    assert wr.low == pytest.approx(0.025 ** 0.25)
    tied = win_rate([0.4, 0.4, 0.3, 0.2], 0)  # beats 2 of 3 others, ties the third
    assert tied.beaten == pytest.approx(2.5 / 3) and tied.estimate == pytest.approx(3.5 / 5)
    worst = win_rate([0.0, 1.0, 2.0], 0)
    assert worst.estimate == pytest.approx(1 / 4) and worst.beaten == 0.0
    assert win_rate([1.0], 0).estimate == 0.5


# ---- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,agg,k,members", [
    ("ensemble:a,b,c", "mean", 1.0, ("a", "b", "c")),
    ("ensemble[min]:a, -b", "min", 1.0, ("a", "-b")),
    ("ensemble[median]:a,b,c", "median", 1.0, ("a", "b", "c")),
    ("ensemble[mean_minus_std=0.5]:a,b", "mean_minus_std", 0.5, ("a", "b")),
    ("ensemble[mean_minus_std]:a,b", "mean_minus_std", 1.0, ("a", "b")),
    ("calibrated:hf:org/model", "mean", 1.0, ("hf:org/model",)),
])
def test_spellings(name, agg, k, members):
    spec = ensemble.parse(name)
    assert (spec.aggregation, spec.k, spec.members) == (agg, k, members)


@pytest.mark.parametrize("name,says", [
    ("ensemble[max]:a,b", "unknown aggregation"),
    ("ensemble:a", "2 to 8 members"),
    ("ensemble:a,a", "twice"),
    ("ensemble:a,-a", "twice"),
    ("ensemble:a,,b", "malformed"),
    ("ensemble:a,--b", "malformed"),
    ("ensemble:a,calibrated:b", "do not nest"),
    ("ensemble[min=1]:a,b", "only mean_minus_std"),
    ("ensemble[mean_minus_std=-1]:a,b", "[0, 100]"),
    ("ensemble[mean_minus_std=nan]:a,b", "[0, 100]"),
    ("ensemble[min:a,b", "spell an ensemble"),
    ("calibrated:a,b", "one scorer name"),
    ("calibrated:", "one scorer name"),
])
def test_bad_spellings_are_unknown_scorers_saying_why(name, says):
    with pytest.raises(UnknownScorer, match=says.replace("[", r"\[")):
        registry().load_now(name)


async def test_members_resolve_through_the_registrys_get_and_its_seal():
    reg = registry()
    with pytest.raises(UnknownScorer, match="member 2 of 2: unknown scorer 'nope'"):
        await reg.get("ensemble:a,nope")
    reg.seal()
    assert isinstance(await reg.get("ensemble:a,b"), ensemble.EnsembleScorer)
    with pytest.raises(UnknownScorer, match="member 2 of 2: unknown scorer: this server") as e:
        await reg.get("ensemble:a,hf:/some/path")  # a request never loads a model
    assert "/some/path" not in str(e.value)


async def test_each_get_builds_a_new_ensemble_so_batching_never_mixes_requests():
    reg = registry()
    one, two = await reg.get("ensemble:a,b"), await reg.get("ensemble:a,b")
    assert one is not two and one.members[0].scorer is two.members[0].scorer


# ---- scoring --------------------------------------------------------------------------------


def test_members_on_different_scales_are_combined_as_quantiles():
    reg = registry()
    # a: [1, 5, 3] -> [0, 1, .5];  b: [-100, 0, 900] -> [0, .5, 1];  -c: [-.2, -.1, -.3] -> [.5, 1, 0]
    texts = ["x", "y", "z"]
    assert reg.load_now("ensemble:a,b").score("p", texts) == [0.0, 0.75, 0.75]
    assert reg.load_now("ensemble[min]:a,b,-c").score("p", texts) == [0.0, 0.5, 0.0]
    assert reg.load_now("ensemble[median]:a,b,-c").score("p", texts) == [0.0, 1.0, 0.5]
    # raw b would dominate a mean (its scale is 100× larger); calibrated it does not
    assert reg.load_now("calibrated:b").score("p", texts) == [0.0, 0.5, 1.0]


def test_members_are_scored_concurrently():
    barrier = threading.Barrier(2, timeout=10)  # both members must be inside score at once

    class Waits:
        def __init__(self, name):
            self.name = name

        def score(self, prompt, responses):
            barrier.wait()
            return [float(len(r)) for r in responses]

    reg = registry(w1=lambda: Waits("w1"), w2=lambda: Waits("w2"))
    assert reg.load_now("ensemble:w1,w2").score("p", ["aa", "b"]) == [1.0, 0.0]


def test_a_failing_member_fails_the_call_named_never_dropped():
    reg = registry()
    with pytest.raises(RuntimeError, match="scorer failed") as e:
        reg.load_now("ensemble:a,boom").score("p", ["x", "y", "z"])
    assert "raised by ensemble member boom" in e.value.__notes__

    class Down:
        name = "remote:rm"

        def score(self, prompt, responses):
            raise UpstreamUnavailable(504, "remote:rm timed out", "reward_model_timeout")

    reg = registry(**{"remote:rm": Down})
    with pytest.raises(UpstreamUnavailable) as e:
        reg.load_now("ensemble:a,remote:rm").score("p", ["x"])
    assert (e.value.status, e.value.code) == (504, "reward_model_timeout")
    assert e.value.message.startswith("ensemble member remote:rm:")


def test_a_member_returning_the_wrong_count_or_nan_fails():
    reg = registry(short=lambda: FixedScores([1.0], "short"),
                   nan=lambda: FixedScores([float("nan")] * 3, "nan"))
    with pytest.raises(RuntimeError, match="member short returned 1 scores for 3"):
        reg.load_now("ensemble:a,short").score("p", ["x", "y", "z"])
    with pytest.raises(RuntimeError, match="member nan returned NaN"):
        reg.load_now("ensemble:a,nan").score("p", ["x", "y", "z"])


def test_an_ensemble_of_value_heads_reads_token_ids():
    reg = registry(**{"value:f0": lambda: FakeFudgeHead(0, "value:f0"),
                      "value:f1": lambda: FakeFudgeHead(1, "value:f1")})
    both = reg.load_now("ensemble:value:f0,value:f1")
    assert isinstance(both, ensemble.TokenEnsembleScorer)
    # f0 counts id 0: [2, 0, 1] -> [1, 0, .5]; f1 counts id 1: [0, 1, 1] -> [0, .75, .75]
    assert both.score_ids([5], [[0, 0], [1], [0, 1]]) == [0.5, 0.375, 0.625]
    mixed = reg.load_now("ensemble:a,value:f0")
    assert not hasattr(mixed, "score_ids")  # text: the heads' text path (approximate)


# ---- through the strategies -----------------------------------------------------------------


def request(n, objective, **kw):
    return DecodeRequest(prompt_ids=[1, 2, 3], prompt_text="hello",
                         sampling=Sampling(max_tokens=12), n=n, objective=objective, **kw)


async def test_best_of_n_with_a_calibrated_reward_picks_the_same_and_reports_its_quantile():
    raw = Objective(FixedScores([0.3, 0.9, 0.1, 0.5]))
    cal = Objective(ensemble.load("calibrated:x", lambda _: FixedScores([0.3, 0.9, 0.1, 0.5])))
    a = await STRATEGIES["best_of_n"].run(request(4, raw), DecodeContext(FakeEngine(seed=2)))
    b = await STRATEGIES["best_of_n"].run(request(4, cal, return_candidates=True),
                                          DecodeContext(FakeEngine(seed=2)))
    assert a.sample.text == b.sample.text and b.reward == 1.0
    assert [c.reward for c in b.candidates] == [pytest.approx(1 / 3), 1.0, 0.0,
                                                pytest.approx(2 / 3)]
    assert b.extra["win_rate_estimate"] == pytest.approx(4 / 5) == a.extra["win_rate_estimate"]


async def test_soft_best_of_n_reports_the_win_rate_of_what_it_drew():
    obj = Objective(FixedScores([0.0, 1.0, 2.0, 3.0]))
    res = await STRATEGIES["soft_best_of_n"].run(request(4, obj, seed=5, return_candidates=True),
                                                 DecodeContext(FakeEngine(seed=1)))
    i = next(j for j, c in enumerate(res.candidates) if c.sample is res.sample)
    assert res.extra["win_rate_estimate"] == pytest.approx((i + 1) / 5)
    assert res.extra["win_rate_beaten"] == pytest.approx(i / 3)
    lo, hi = res.extra["win_rate_interval"]
    assert 0 < lo < res.extra["win_rate_estimate"] < hi < 1


# ---- through the API ------------------------------------------------------------------------


async def test_api_best_of_n_with_an_ensemble_reward(client):
    req = {**CHAT, "alignment": {"strategy": "best_of_n", "n": 6, "return_candidates": True,
                                 "reward": "ensemble[min]:good_count,-bad_count"}}
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    a = r.json()["alignment"]
    assert all(0.0 <= c["reward"] <= 1.0 for c in a["candidates"])
    assert a["reward"] == max(c["reward"] for c in a["candidates"])
    assert a["win_rate_bound"] == pytest.approx(6 / 7)
    assert 0 < a["win_rate_estimate"] <= 6 / 7 + 1e-12
    assert len(a["win_rate_interval"]) == 2


async def test_api_refuses_a_bad_ensemble_naming_the_field(client):
    for reward in ("ensemble[max]:good_count,bad_count", "ensemble:good_count,nope"):
        req = {**CHAT, "alignment": {"strategy": "best_of_n", "reward": reward}}
        r = await client.post("/v1/chat/completions", json=req)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == ("alignment.reward", "unknown_scorer")


async def test_api_failing_member_fails_the_request(client):
    req = {**CHAT, "alignment": {"strategy": "best_of_n", "reward": "ensemble:good_count,exploding"}}
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
