"""Reward ensembles, calibrated rewards and the Nash rule on the real engine, through the API:
best-of-n with `calibrated:` and `ensemble[...]:` rewards, nash with a panel, streamed too."""

from __future__ import annotations

import math

import openai
import pytest

from decoding.calibration import loo_quantiles

pytestmark = pytest.mark.integration

ASK = [{"role": "user", "content": "Suggest a name for a friendly robot."}]
PANEL = "ensemble:relevance,sentiment,-profanity"


def aligned(client, model_name, alignment, **kw):
    return client.chat.completions.create(
        model=model_name, messages=ASK, max_tokens=24, temperature=1.0, seed=11,
        extra_body={"alignment": {"return_candidates": True, **alignment}}, **kw)


def test_calibrated_reward_is_the_raw_rewards_quantile_and_selects_the_same(client, model_name):
    raw = aligned(client, model_name, {"strategy": "best_of_n", "n": 6, "reward": "relevance"})
    cal = aligned(client, model_name, {"strategy": "best_of_n", "n": 6,
                                       "reward": "calibrated:relevance"})
    raw_a, cal_a = raw.model_extra["alignment"], cal.model_extra["alignment"]
    # same seed, same candidates; the calibrated reward of each is its leave-one-out quantile
    assert [c["text"] for c in raw_a["candidates"]] == [c["text"] for c in cal_a["candidates"]]
    expected = loo_quantiles([c["reward"] for c in raw_a["candidates"]])
    assert [c["reward"] for c in cal_a["candidates"]] == pytest.approx(expected)
    # a monotone transform of the reward: best-of-n returns the same answer
    assert cal.choices[0].message.content == raw.choices[0].message.content
    assert cal_a["win_rate_estimate"] == pytest.approx(raw_a["win_rate_estimate"])
    assert cal_a["win_rate_estimate"] <= cal_a["win_rate_bound"] + 1e-12
    lo, hi = cal_a["win_rate_interval"]
    assert 0 < lo <= cal_a["win_rate_estimate"] <= hi <= 1


def test_best_of_n_with_an_uncertainty_weighted_ensemble(client, model_name):
    r = aligned(client, model_name, {"strategy": "best_of_n", "n": 6,
                                     "reward": "ensemble[mean_minus_std=0.5]:relevance,sentiment"})
    a = r.model_extra["alignment"]
    rewards = [c["reward"] for c in a["candidates"]]
    assert all(-0.5 <= x <= 1.0 for x in rewards)  # quantiles in [0, 1] minus ½·std ≤ ½
    best = max(range(6), key=rewards.__getitem__)
    assert r.choices[0].message.content == a["candidates"][best]["text"]
    assert a["kl_bound"] == pytest.approx(math.log(6) - 5 / 6)


def test_nash_with_a_panel_draws_from_its_lottery(client, model_name):
    r = aligned(client, model_name, {"strategy": "nash", "n": 5, "reward": PANEL})
    a = r.model_extra["alignment"]
    assert a["strategy"] == "nash" and a["users"] == ["relevance", "sentiment", "-profanity"]
    assert sum(a["lottery"]) == pytest.approx(1, abs=1e-5) and len(a["lottery"]) == 5
    i = a["chosen_index"]
    assert a["lottery"][i] > 0
    assert r.choices[0].message.content == a["candidates"][i]["text"]
    if a["condorcet_winner"] is not None:
        assert a["lottery"][a["condorcet_winner"]] == pytest.approx(1, abs=1e-5)
    assert set(a["user_utilities"]) == {"relevance", "sentiment", "-profanity"}
    assert -1 <= a["user_utilities"]["-profanity"] <= 0
    assert a["kl_bound"] == pytest.approx(math.log(5)) and a["kl_estimate"] is None
    again = aligned(client, model_name, {"strategy": "nash", "n": 5, "reward": PANEL})
    assert again.choices[0].message.content == r.choices[0].message.content  # seeded draw


def test_nash_streams(client, model_name):
    chunks = list(aligned(client, model_name, {"strategy": "nash", "n": 4, "reward": PANEL},
                          stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    a = finals[-1].model_extra["alignment"]
    assert text and len(a["lottery"]) == 4
    assert text == a["candidates"][a["chosen_index"]]["text"]


def test_a_member_the_server_would_not_load_is_refused(client, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        aligned(client, model_name, {"strategy": "best_of_n", "n": 2,
                                     "reward": "ensemble:relevance,hf:/tmp/not-a-model"})
    assert e.value.body["param"] == "alignment.reward"
