"""cost_weight "auto" end to end on the fake engine: the answer's `alignment.constraint` (the
served rule's λ and predicted safety) and `alignment.warnings` (issue 26, items 1 and 2).
Needs the serving hooks of server/serving/resolve.py, data.py, render.py and protocol.py."""

import httpx
from fakes import FakeEngine, make_app

from decoding.dual import DualSolution, save_solution

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "say something good"}],
        "max_tokens": 8}
RECORD = {"model": "fake", "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
          "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
          "max_tokens": 8}
# The toy as K = 10 reference samples: p(A) = 0.1 (r = 1, g = −1), p(B) = 0.9.
TOY = {"rewards": [[1.0] + [0.0] * 9], "safety": [[-1.0] + [0.0] * 9]}


def dual(tmp_path, lam=0.865, beta=0.1, threshold=-0.3):
    path = tmp_path / "dual.json"
    save_solution(path, DualSolution(lam, beta, threshold, "good_count", "bad_count", threshold,
                                     -0.1, 1, 10, True, sampling=RECORD, reference=TOY))
    return path


async def post(app, body):
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await c.post("/v1/chat/completions", json=body)


async def test_best_of_n_auto_reports_its_own_lambda_and_predicted_safety(tmp_path):
    app = make_app(FakeEngine(seed=5, full_length=True), dual=dual(tmp_path))
    r = await post(app, {**CHAT, "alignment": {"strategy": "best_of_n", "n": 8,
                                               "cost_weight": "auto"}})
    assert r.status_code == 200, r.text
    a = r.json()["alignment"]
    c = a["constraint"]
    assert c["rule"] == "best_of_n" and c["n"] == 8 and c["threshold"] == -0.3
    assert 1.0 < c["lambda"] < 1.0 + 1e-5 and a["cost_weight"] == c["lambda"]  # not λ* = 0.865
    assert c["predicted_safety"] >= -0.3
    lo, hi = c["predicted_safety_interval"]
    assert lo <= c["predicted_safety"] <= hi
    assert "not a per-answer guarantee" in c["scope"]
    assert not a.get("warnings")  # sampled as the reference samples were


async def test_numeric_weight_reports_no_constraint(tmp_path):
    app = make_app(FakeEngine(seed=5, full_length=True), dual=dual(tmp_path))
    r = await post(app, {**CHAT, "alignment": {"strategy": "best_of_n", "n": 4,
                                               "cost": "bad_count", "cost_weight": 0.5}})
    assert r.status_code == 200 and r.json()["alignment"]["constraint"] is None


async def test_sampling_other_than_the_dual_s_is_warned(tmp_path):
    app = make_app(FakeEngine(seed=5, full_length=True), dual=dual(tmp_path))
    r = await post(app, {**CHAT, "max_tokens": 12, "temperature": 0.7,
                         "alignment": {"strategy": "best_of_n", "n": 8, "cost_weight": "auto"}})
    assert r.status_code == 200, r.text
    (warning,) = r.json()["alignment"]["warnings"]
    assert "temperature 0.7" in warning and "max_tokens 12" in warning


async def test_soft_best_of_n_auto_selects_at_beta_and_reports_ess(tmp_path):
    app = make_app(FakeEngine(seed=5, full_length=True), dual=dual(tmp_path))
    r = await post(app, {**CHAT, "alignment": {"strategy": "soft_best_of_n", "n": 8,
                                               "cost_weight": "auto"}})
    assert r.status_code == 200, r.text
    a = r.json()["alignment"]
    c = a["constraint"]
    assert c["rule"] == "soft_best_of_n" and c["selection_temperature"] == 0.1
    assert a["cost_weight"] == 0.865 and c["lambda"] == 0.865
    assert 1.0 <= c["selection_ess"] <= 8.0
    assert c["tilted_safety"] == -0.3  # π_λ*'s own, its n → ∞ limit
    lo, hi = c["predicted_safety_interval"]
    assert lo <= c["predicted_safety"] <= hi
