"""Issue 26 on the real engine and model: what the API reports holds for what was sampled.

- speculative rejection chooses the argmax of the objective over the survivors and every track
  that had finished when it was rejected, and its scorer work (`scorer_calls`,
  `scored_tokens`) is consistent with its decision points;
- tokenwise CD with a CD-Q head trained here (`alignserve train-value`, which stores the
  training targets' range): `kl_bound` is the certified max_tokens·min(λR, λ²R²/8) (in the
  engine) or max_tokens·(… + log(V/k)) (per token), never below the answer's own estimate,
  and the per-token estimate counts the mass outside the top k.

The session's heads server (conftest.py, `value:cdq` trained there by the CLI) serves both.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest

pytestmark = pytest.mark.integration

ASK = [{"role": "user", "content": "Give me three tips for sleeping better."}]


def chat(srv, alignment: dict, max_tokens: int, seed: int = 5) -> dict:
    body = {"messages": ASK, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
            "alignment": alignment}
    r = httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def test_speculative_rejection_picks_among_survivors_and_finished_tracks(heads_server):
    n, d, max_tokens = 8, 4, 40
    for seed in (1, 2):
        body = chat(heads_server, {"strategy": "speculative_rejection", "n": n, "alpha": 0.5,
                                      "decision_tokens": d, "growth": 2.0,  # the points below
                                      "return_candidates": True},
                    max_tokens, seed)
        a = body["alignment"]
        weight = a["cost_weight"] or 0.0

        def score(c, weight=weight):  # the request's objective: reward − cost_weight·cost
            return c["reward"] - weight * (c["cost"] or 0.0)

        eligible = [c for c in a["candidates"] if c["finish_reason"] is not None]
        best = max(score(c) for c in eligible)
        first = next(c for c in eligible if score(c) == best)
        assert a["reward"] == first["reward"]
        assert first["text"] == body["choices"][0]["message"]["content"]
        assert len(eligible) >= n - sum(a["rejected"])
        # scorer work: every pool member at every decision point (d, 3d, 7d, ... with growth
        # 2), at most, plus the eligible answers whole; at least the first decision's N
        pools, sizes, left = [], [], n
        point, stretch = d, d
        for rejected in a["rejected"]:
            pools.append(point)
            sizes.append(left)
            left -= rejected
            stretch *= 2
            point += stretch
        assert n <= a["scorer_calls"] <= sum(sizes) + len(eligible)
        assert a["scored_tokens"] <= sum(s * p for s, p in zip(sizes, pools)) + \
            sum(c["tokens"] for c in eligible)
        assert a["scored_candidates"] == n


def test_tokenwise_kl_bound_is_certified(heads_server, value_heads):
    cdq_head = value_heads["cdq"]
    config = json.loads((cdq_head / "config.json").read_text())
    lo, hi = config["value_range"]
    spread, lam, max_tokens = hi - lo, 2.0, 16
    step = min(lam * spread, (lam * spread) ** 2 / 8)

    a = chat(heads_server, {"strategy": "tokenwise_cd", "lambda": lam, "value": "value:cdq"},
             max_tokens)["alignment"]
    assert a["in_engine"]
    assert a["kl_bound"] == pytest.approx(max_tokens * step)
    assert 0 <= a["kl_estimate"] <= a["kl_bound"] + 1e-9
    assert a["kl_estimate"] <= a["kl_path_bound"] + 1e-4  # float32 in the engine

    k = 5
    a = chat(heads_server, {"strategy": "tokenwise_cd", "lambda": lam, "value": "value:cdq",
                               "top_k": k}, max_tokens)["alignment"]
    assert not a["in_engine"]
    vocab = config["vocab_size"]
    assert a["kl_bound"] == pytest.approx(max_tokens * (step + math.log(vocab / k)))
    # against p itself: the mass outside the top k is part of the estimate
    assert a["kl_outside_top_k"] > 0 and a["kl_estimate"] >= a["kl_outside_top_k"] - 1e-9
    assert a["kl_estimate"] <= a["kl_bound"]
