"""Nash with the llm-judge on the real engine (issue 28): the served SmolLM2 compares every pair
of its own answers through one-token engine calls (decoding/pairwise.py). The judge is built in
(it loads nothing), so the shared server serves it without a start-up flag."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.integration

ASK = [{"role": "user", "content": "Suggest a name for a friendly robot."}]


def test_nash_with_the_llm_judge_answers_from_its_lottery(client, model_name):
    n = 4
    r = client.chat.completions.create(
        model=model_name, messages=ASK, max_tokens=16, temperature=1.0, seed=5,
        extra_body={"alignment": {"strategy": "nash", "n": n, "judge": "llm-judge",
                                  "reward": "relevance", "return_candidates": True}})
    a = r.model_extra["alignment"]
    assert a["strategy"] == "nash" and a["judge"] == "llm-judge"
    # the matrix of real answers: a probability per pair, antisymmetric, ½ on the diagonal
    p = np.asarray(a["preference_matrix"])
    assert p.shape == (n, n) and ((0 <= p) & (p <= 1)).all()
    assert np.allclose(p + p.T, 1, atol=1e-5) and np.allclose(np.diag(p), 0.5)
    # n(n − 1) one-token calls, each of which returned the letters' log-probs (the equal logit
    # bias put them on top), so the matrix is the judge's reading and not the ½ of abstention
    assert a["judge_engine_calls"] == n * (n - 1) and a["judge_abstained"] == 0
    assert np.abs(p - 0.5).max() > 1e-6
    assert sum(a["lottery"]) == pytest.approx(1, abs=1e-5) and len(a["lottery"]) == n
    i = a["chosen_index"]
    assert a["lottery"][i] > 0
    assert r.choices[0].message.content == a["candidates"][i]["text"]
    if a["condorcet_winner"] is not None:
        w = a["condorcet_winner"]
        assert (p[w, np.arange(n) != w] > 0.5).all() and a["lottery"][w] == pytest.approx(1, abs=1e-5)
    assert "users" not in a  # a judge has no users to report
    assert a["kl_bound"] == pytest.approx(math.log(n)) and a["kl_estimate"] is None
    assert a["scorer_calls"] == n + n * 2 * (n - 1)  # relevance read n; the judge 2(n − 1) each
