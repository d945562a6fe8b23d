"""cost_weight "auto" on the real engine (issue 26): `alignserve dual` on real rollouts (SmolLM2,
relevance reward, profanity cost), then a server started with that dual answers best-of-n with
best-of-n's own λ and the predicted E[g] with its interval, refuses rules it is not solved for,
and warns when a request samples otherwise than the rollouts did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from live import ROOT

from decoding.dual_rules import bon_safety_bound, solve_bon
from dual.cli import load_scores

CHAT = {"messages": [{"role": "user", "content": "Give me one tip for cooking rice."}],
        "max_tokens": 8, "temperature": 1.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def dual_server(rollout_folder, launch_server, tmp_path_factory):
    """`alignserve dual` on the session's rollouts (2 prompts × 2 samples), with a threshold
    between best-of-2's safety at λ = 0 and its reachable one, both as the 95 % lower bound the
    default --confidence solves on; a server started with it."""
    folder = tmp_path_factory.mktemp("dual-auto")
    _, _, _, r, cost = load_scores(rollout_folder, None, None)
    g = -cost
    f0, top = (bon_safety_bound(r, g, 2, lam, 0.95) for lam in (0.0, 1e9))
    b = float((f0 + top) / 2) if top > f0 else float(f0 - 0.01)
    out = folder / "dual.json"
    p = subprocess.run([str(Path(sys.executable).parent / "alignserve"), "dual", "--rollouts",
                        str(rollout_folder), "--beta", "0.1", "--threshold", repr(b),
                        "--bon-n", "1,2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "best-of-2: λ =" in p.stdout
    with launch_server(folder / "server.log", ["--kv-cache-gib", "1", "--dual", str(out)]) as srv:
        yield srv, r, g, b


def chat(srv, **alignment) -> httpx.Response:
    return httpx.post(f"{srv.base_url}/v1/chat/completions", timeout=300,
                      json={**CHAT, "alignment": {"cost_weight": "auto", **alignment}})


def test_best_of_n_auto_serves_its_own_lambda_and_reports_the_prediction(dual_server):
    srv, r, g, b = dual_server
    resp = chat(srv, strategy="best_of_n", n=2)
    assert resp.status_code == 200, resp.text
    a = resp.json()["alignment"]
    c = a["constraint"]
    want = solve_bon(r, g, 2, b, confidence=0.95)
    assert c["rule"] == "best_of_n" and c["n"] == 2 and c["confidence"] == 0.95
    assert c["predicted_safety_lower"] == pytest.approx(want.lower_bound)
    assert want.lower_bound >= b
    assert a["cost_weight"] == pytest.approx(want.lam) and c["lambda"] == a["cost_weight"]
    assert c["predicted_safety"] == pytest.approx(want.predicted_safety)
    assert c["predicted_safety"] >= c["predicted_safety_lower"]
    lo, hi = c["predicted_safety_interval"]
    assert lo <= c["predicted_safety"] <= hi
    assert c["reference"] == {"prompts": r.shape[0], "samples": r.shape[1]}
    # an n the file's table lacks is solved exactly from the stored reference scores
    resp = chat(srv, strategy="best_of_n", n=3)
    assert resp.status_code == 200, resp.text
    assert resp.json()["alignment"]["cost_weight"] == pytest.approx(
        solve_bon(r, g, 3, b, confidence=0.95).lam)


def test_auto_refuses_rules_it_is_not_solved_for(dual_server):
    srv, *_ = dual_server
    resp = chat(srv, strategy="speculative_rejection", n=2)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "alignment.cost_weight" and err["code"] == "dual_unsupported_strategy"


def test_soft_best_of_n_auto_selects_at_beta_with_its_ess(dual_server):
    srv, r, g, _ = dual_server
    resp = chat(srv, strategy="soft_best_of_n", n=2)
    assert resp.status_code == 200, resp.text
    c = resp.json()["alignment"]["constraint"]
    assert c["selection_temperature"] == 0.1 and 1.0 <= c["selection_ess"] <= 2.0
    assert np.isfinite(c["tilted_safety"])


def test_other_sampling_gets_a_warning(dual_server):
    srv, *_ = dual_server
    resp = httpx.post(f"{srv.base_url}/v1/chat/completions", timeout=300,
                      json={**CHAT, "temperature": 0.5, "alignment": {
                          "strategy": "best_of_n", "n": 2, "cost_weight": "auto"}})
    assert resp.status_code == 200, resp.text
    warnings = resp.json()["alignment"]["warnings"]
    assert any("temperature 0.5 (solved at 1.0)" in w for w in warnings), warnings
