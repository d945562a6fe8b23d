"""CAN's dual (decoding/dual.py), `cost_weight: "auto"` on the server, and `alignserve dual`."""

import json
import math

import httpx
import numpy as np
import pytest
from fakes import FakeEngine, make_app

from decoding.dual import (
    DualSolution,
    InfeasibleConstraint,
    achievable_safety,
    dual_gradient,
    dual_objective,
    load_solution,
    predicted_safety,
    save_solution,
    solve_dual,
)


def synthetic(seed=0, prompts=12, samples=10, m=None):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(prompts, samples))
    shape = (prompts, samples) if m is None else (prompts, samples, m)
    # Safety anti-correlated with reward, so that the constraint costs reward (λ* > 0 matters).
    g = -rng.uniform(size=shape) - 0.3 * (r if m is None else r[..., None])
    return r, g


# ---------------------------------------------------------------------------- the solver


def test_objective_is_the_formula():
    r, g = synthetic()
    beta, b, lam = 0.7, -0.4, 1.3
    direct = beta * np.mean(np.log(np.mean(np.exp((r + lam * (g - b)) / beta), axis=1)))
    assert dual_objective(r, g, beta, b, lam) == pytest.approx(direct, rel=1e-12)


def test_active_constraint_matches_grid_minimum():
    r, g = synthetic()
    beta = 0.5
    b = g.mean() + 0.4 * (achievable_safety(g) - g.mean())  # between reference and reachable
    lam = solve_dual(r, g, beta, b)
    grid = np.linspace(0, 3 * lam, 6001)
    best = grid[np.argmin([dual_objective(r, g, beta, b, x) for x in grid])]
    assert lam > 0 and abs(lam - best) <= grid[1]
    assert dual_objective(r, g, beta, b, lam) <= min(
        dual_objective(r, g, beta, b, x) for x in (best - grid[1], best, best + grid[1])) + 1e-12
    # ∇D̂ changes sign at λ*: the constraint holds with equality under π_λ*
    assert dual_gradient(r, g, beta, b, 0.98 * lam) < 0 < dual_gradient(r, g, beta, b, 1.02 * lam)
    assert abs(dual_gradient(r, g, beta, b, lam)) < 1e-8
    assert predicted_safety(r, g, beta, lam) == pytest.approx(b, abs=1e-8)
    # active: the unconstrained optimum π_0 ∝ p·exp(r/β) falls short of b
    assert predicted_safety(r, g, beta, 0.0) < b


def test_inactive_constraint_gives_zero():
    r, g = synthetic()
    # π_0 ∝ p·exp(r/β) already meets it (the reference's own mean is not the test)
    b = predicted_safety(r, g, 0.5, 0.0) - 0.01
    assert solve_dual(r, g, 0.5, b) == 0.0
    assert dual_gradient(r, g, 0.5, b, 0.0) >= 0
    grid = np.linspace(0, 5, 501)
    assert np.argmin([dual_objective(r, g, 0.5, b, x) for x in grid]) == 0


def test_infeasible_constraint_raises_with_the_reachable_safety():
    r, g = synthetic()
    reach = achievable_safety(g)
    with pytest.raises(InfeasibleConstraint) as info:
        solve_dual(r, g, 0.5, reach + 0.01)
    assert info.value.achievable == pytest.approx(reach)
    with pytest.raises(InfeasibleConstraint):  # equality: λ* would be infinite
        solve_dual(r, g, 0.5, reach)
    # just below the reachable limit: a finite, large λ that meets it
    lam = solve_dual(r, g, 0.5, reach - 1e-3)
    assert math.isfinite(lam) and predicted_safety(r, g, 0.5, lam) == pytest.approx(reach - 1e-3, abs=1e-7)


def test_two_constraints_match_grid_minimum():
    r, g = synthetic(seed=3, m=2)
    beta = 0.5
    b = g.mean(axis=(0, 1)) + 0.35 * (achievable_safety(g) - g.mean(axis=(0, 1)))
    lam = solve_dual(r, g, beta, b)
    assert lam.shape == (2,) and (lam >= 0).all()
    xs = np.linspace(0, 2.5 * lam.max() + 0.1, 161)
    vals = np.array([[dual_objective(r, g, beta, b, [x, y]) for y in xs] for x in xs])
    i, j = np.unravel_index(np.argmin(vals), vals.shape)
    assert np.abs(lam - [xs[i], xs[j]]).max() <= 1.5 * xs[1]
    assert dual_objective(r, g, beta, b, lam) <= vals.min() + 1e-12
    # KKT: zero gradient where λ_j > 0, non-negative where λ_j = 0
    grad = dual_gradient(r, g, beta, b, lam)
    assert all(abs(gj) < 1e-8 if lj > 0 else gj >= -1e-8 for lj, gj in zip(lam, grad))
    assert (predicted_safety(r, g, beta, lam) >= b - 1e-8).all()


def test_two_constraints_one_inactive():
    r, g = synthetic(seed=4, m=2)
    b = np.array([g[..., 0].mean() + 0.3 * (achievable_safety(g[..., 0]) - g[..., 0].mean()),
                  g[..., 1].mean() - 1.0])  # the second is met by the reference, λ* included
    lam = solve_dual(r, g, 0.5, b)
    assert lam[1] == 0.0 and lam[0] == pytest.approx(solve_dual(r, g[..., 0], 0.5, b[0]), rel=1e-6)


def test_stable_with_rewards_far_above_beta():
    r, g = synthetic()
    b = g.mean() + 0.4 * (achievable_safety(g) - g.mean())
    base = solve_dual(r, g, 0.5, b)
    # D̂ scales: (c·r, c·β, c·λ) gives c·D̂, so λ* scales by c; exponents reach ~1e3·c here
    big = solve_dual(r * 1e3, g, 0.5e3, b)
    assert big == pytest.approx(1e3 * base, rel=1e-6)
    tiny_beta = solve_dual(r, g, 1e-3, b)  # r/β ~ 1e3: a naive exp overflows
    assert math.isfinite(tiny_beta) and predicted_safety(r, g, 1e-3, tiny_beta) == pytest.approx(b, abs=1e-7)
    assert math.isfinite(dual_objective(r * 1e3, g, 1.0, b, 10.0))


def test_predicted_safety_hand_values():
    r, g = np.array([[0.0, 0.0]]), np.array([[0.0, -1.0]])
    assert predicted_safety(r, g, 1.0, 0.0) == pytest.approx(-0.5)
    # weights ∝ exp(λ·g) = [1, 1/3] → [3/4, 1/4]
    assert predicted_safety(r, g, 1.0, math.log(3)) == pytest.approx(-0.25)
    # two prompts: the mean of their self-normalised expectations; reward tilts too
    r2, g2 = np.array([[0.0, 0.0], [math.log(3), 0.0]]), np.array([[0.0, -1.0], [-1.0, 0.0]])
    assert predicted_safety(r2, g2, 1.0, 0.0) == pytest.approx((-0.5 - 0.75) / 2)


def test_solution_file_round_trip_and_validation(tmp_path):
    sol = DualSolution(1.5, 0.2, -0.1, "relevance", "profanity", -0.1, -0.2, 10, 8, True)
    save_solution(tmp_path / "d.json", sol, extra_field=1)
    assert load_solution(tmp_path / "d.json") == sol
    (tmp_path / "bad.json").write_text(json.dumps({**sol.to_json(), "lambda": -1}))
    with pytest.raises(ValueError, match="bad.json"):
        load_solution(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="missing"):
        load_solution(tmp_path / "missing.json")


# ---------------------------------------------------------------------------- serving


CHAT = {"model": "fake", "messages": [{"role": "user", "content": "say something good"}],
        "max_tokens": 8}


def dual_file(tmp_path, lam=2.5, reward="good_count", cost="bad_count", bon=None,
              reference=None, sampling=None):
    """A dual file whose best-of-8 λ is `lam` (stored table, no reference scores) unless
    `bon` / `reference` say otherwise."""
    path = tmp_path / "dual.json"
    table = {8: {"lambda": lam, "predicted_safety": -0.2, "interval": [-0.25, -0.15],
                 "edge": lam}} if bon is None else bon
    save_solution(path, DualSolution(lam, 0.5, -0.2, reward, cost, -0.2, -0.6, 4, 8, True,
                                     sampling=sampling or {}, best_of_n=table,
                                     reference=reference))
    return path


async def post(app, body):
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await c.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("strategy", ["best_of_n"])
async def test_auto_uses_the_dual_lambda(tmp_path, strategy):
    app = make_app(FakeEngine(seed=5, full_length=True), dual=dual_file(tmp_path))
    # no cost named: "auto" brings the dual's cost scorer along
    req = {**CHAT, "alignment": {"strategy": strategy, "n": 8, "cost_weight": "auto",
                                 "return_candidates": True}}
    r = await post(app, req)
    assert r.status_code == 200, r.text
    a = r.json()["alignment"]
    assert a["cost_weight"] == 2.5 and a["cost"] is not None
    finished = [c for c in a["candidates"] if c["finish_reason"] is not None]
    scores = [c["reward"] - 2.5 * c["cost"] for c in finished]
    best = finished[scores.index(max(scores))]
    assert (a["reward"], a["cost"]) == (best["reward"], best["cost"])


async def test_auto_selection_differs_from_reward_only(tmp_path):
    # With a huge λ* the chosen answer must have the fewest "bad" of all candidates.
    app = make_app(FakeEngine(seed=9, full_length=True), dual=dual_file(tmp_path, lam=1000.0))
    req = {**CHAT, "alignment": {"strategy": "best_of_n", "n": 8, "cost": "bad_count",
                                 "cost_weight": "auto", "return_candidates": True}}
    a = (await post(app, req)).json()["alignment"]
    assert a["cost"] == min(c["cost"] for c in a["candidates"])


async def test_auto_without_dual_is_400(tmp_path):
    r = await post(make_app(), {**CHAT, "alignment": {"strategy": "best_of_n", "n": 2,
                                                      "cost_weight": "auto"}})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "alignment.cost_weight" and err["type"] == "invalid_request_error"
    assert "dual" in err["message"]


async def test_auto_with_another_cost_or_reward_is_400(tmp_path):
    app = make_app(dual=dual_file(tmp_path))
    r = await post(app, {**CHAT, "alignment": {"strategy": "best_of_n", "n": 2,
                                               "cost": "good_count", "cost_weight": "auto"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "alignment.cost"
    assert "bad_count" in r.json()["error"]["message"]
    r = await post(app, {**CHAT, "alignment": {"strategy": "best_of_n", "n": 2,
                                               "reward": "fixed", "cost_weight": "auto"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "alignment.reward"


async def test_numeric_weight_still_works_with_a_dual(tmp_path):
    app = make_app(dual=dual_file(tmp_path))
    r = await post(app, {**CHAT, "alignment": {"strategy": "best_of_n", "n": 4,
                                               "cost": "bad_count", "cost_weight": 0.5}})
    assert r.status_code == 200 and r.json()["alignment"]["cost_weight"] == 0.5
    r = await post(app, {**CHAT, "alignment": {"strategy": "best_of_n", "n": 4}})
    assert r.json()["alignment"]["cost_weight"] is None  # no cost, no weight
    for bad in ("automatic", -1):
        r = await post(app, {**CHAT, "alignment": {"strategy": "best_of_n", "cost_weight": bad}})
        assert r.status_code == 400 and "cost_weight" in r.json()["error"]["param"]


def test_bad_dual_file_stops_start_up(tmp_path):
    from pydantic import ValidationError

    from server.settings import Settings

    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValidationError, match="broken.json"):
        Settings(dual=tmp_path / "broken.json")
    with pytest.raises(ValidationError, match="dual file"):
        Settings(dual=tmp_path / "absent.json")
    assert Settings(dual=dual_file(tmp_path)).dual == tmp_path / "dual.json"


# ---------------------------------------------------------------------------- `alignserve dual`


def write_rollouts(folder, r, cost, reward_name="relevance", cost_name="profanity"):
    from valuenet.data import Manifest, Rollout, append_rollouts, write_manifest

    n_prompts, k = r.shape
    write_manifest(folder, Manifest(model="m", prompts="p.jsonl", n=k, max_tokens=8,
                                    temperature=1.0, reward=reward_name, cost=cost_name,
                                    count=r.size))
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in range(n_prompts):
        append_rollouts(folder, [Rollout(f"p{i}", f"prompt {i}", [1, 2], j, [3] * (j % 5 + 1),
                                         [-0.5] * (j % 5 + 1), " ".join(words[: j % 5 + 1]),
                                         "stop", float(r[i, j]), float(cost[i, j]))
                                 for j in range(k)])


def test_dual_cli_on_a_synthetic_folder(tmp_path, capsys):
    from cli.main import main

    r, g = synthetic(prompts=6, samples=8)
    cost = -g
    write_rollouts(tmp_path, r, cost)
    b = g.mean() + 0.5 * (achievable_safety(g) - g.mean())
    assert main(["dual", "--rollouts", str(tmp_path), "--reward", "relevance", "--cost",
                 "profanity", "--beta", "0.5", "--threshold", str(b)]) == 0
    out = json.loads((tmp_path / "dual.json").read_text())
    assert out["lambda"] == pytest.approx(solve_dual(r, g, 0.5, b))
    assert out["predicted_safety"] == pytest.approx(b, abs=1e-7)
    assert out["reference_safety"] == pytest.approx(g.mean())
    assert (out["prompts"], out["samples"], out["active"]) == (6, 8, True)
    assert {"beta", "threshold", "reward", "cost"} <= set(out)
    assert (tmp_path / "dual.png").stat().st_size > 1000
    assert "λ* =" in capsys.readouterr().out
    assert load_solution(tmp_path / "dual.json").lam == out["lambda"]  # the server can load it


def test_dual_cli_rescores_when_names_differ(tmp_path):
    from dual.cli import load_scores

    r, g = synthetic(prompts=3, samples=8)
    write_rollouts(tmp_path, r, -g)
    _, reward, cost, rr, cc = load_scores(tmp_path, "length", None, length_target=2)
    assert (reward, cost) == ("length", "profanity")
    words = np.array([[j % 5 + 1 for j in range(8)]] * 3)
    assert np.allclose(rr, -np.abs(words - 2) / 2)  # rescored by the `length` scorer
    assert np.allclose(cc, -g)  # stored


def test_dual_cli_infeasible_exits_1_without_a_file(tmp_path, capsys):
    from cli.main import main

    r, g = synthetic(prompts=4, samples=8)
    write_rollouts(tmp_path, r, -g)
    assert main(["dual", "--rollouts", str(tmp_path), "--beta", "0.5",
                 "--threshold", str(achievable_safety(g) + 0.1)]) == 1
    assert "infeasible" in capsys.readouterr().err
    assert not (tmp_path / "dual.json").exists()


# ------------------------------------------------- "auto" under the rule actually served (issue 26)


def toy_reference():
    """The issue's toy as K = 10 reference samples: p(A) = 0.1 (r = 1, g = −1), p(B) = 0.9."""
    return {"rewards": [[1.0] + [0.0] * 9], "safety": [[-1.0] + [0.0] * 9]}


def test_best_of_n_auto_meets_b_on_the_toy_where_lambda_star_does_not():
    """β = 0.1, b = −0.3: λ* ≈ 0.865 gives best-of-8 E[g] ≈ −0.57; the rule's own λ meets b."""
    from decoding.dual_rules import bon_safety
    from server.constraint import served
    from server.protocol import ChatCompletionRequest

    ref = toy_reference()
    r, g = np.array(ref["rewards"]), np.array(ref["safety"])
    lam_star = solve_dual(r, g, 0.1, -0.3)
    assert lam_star == pytest.approx(0.865, abs=1e-3)
    assert bon_safety(r, g, 8, lam_star) == pytest.approx(-0.57, abs=0.005)
    dual = DualSolution(lam_star, 0.1, -0.3, "good_count", "bad_count", -0.3, -0.1, 1, 10, True,
                        reference=ref)
    a = ChatCompletionRequest.model_validate(
        {**CHAT, "alignment": {"strategy": "best_of_n", "n": 8, "cost_weight": "auto"}}).alignment
    s = served(a, dual)
    assert s.lam > 1.0 and bon_safety(r, g, 8, s.lam) >= -0.3
    assert s.report["predicted_safety"] >= -0.3 and s.report["rule"] == "best_of_n"
    assert s.report["lambda"] == s.lam and "not a per-answer" in s.report["scope"]


def _alignment(strategy, n=8, **extra):
    from server.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate(
        {**CHAT, "alignment": {"strategy": strategy, "n": n, "cost_weight": "auto",
                               **extra}}).alignment


@pytest.mark.parametrize("strategy", ["speculative_rejection", "blockwise_cd"])
async def test_auto_is_refused_for_rules_it_is_not_solved_for(tmp_path, strategy):
    app = make_app(FakeEngine(seed=5, full_length=True), dual=dual_file(tmp_path))
    r = await post(app, {**CHAT, "alignment": {"strategy": strategy, "n": 4,
                                               "cost_weight": "auto"}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "alignment.cost_weight" and err["code"] == "dual_unsupported_strategy"
    assert strategy in err["message"] and "not computed" in err["message"]


async def test_auto_best_of_n_at_an_unstored_n_without_reference_is_400(tmp_path):
    app = make_app(FakeEngine(seed=5, full_length=True), dual=dual_file(tmp_path))
    r = await post(app, {**CHAT, "alignment": {"strategy": "best_of_n", "n": 4,
                                               "cost_weight": "auto"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "alignment.n"
    assert r.json()["error"]["code"] == "dual_n_unsolved" and "n = 8" in r.text


async def test_auto_best_of_n_solves_an_unstored_n_from_the_reference(tmp_path):
    from decoding.dual_rules import solve_bon

    rr, gg = synthetic(prompts=5, samples=8)
    gg = gg + 0.25  # mean safety −0.22: below b = −0.2 (dual_file's), reachable at n = 4
    path = dual_file(tmp_path, bon={}, reference={"rewards": rr.tolist(), "safety": gg.tolist()})
    b = -0.2
    assert solve_bon(rr, gg, 4, b).lam > 0
    app = make_app(FakeEngine(seed=5, full_length=True), dual=path)
    r = await post(app, {**CHAT, "alignment": {"strategy": "best_of_n", "n": 4,
                                               "cost_weight": "auto"}})
    assert r.status_code == 200, r.text
    assert r.json()["alignment"]["cost_weight"] == pytest.approx(solve_bon(rr, gg, 4, b).lam)
    # n = 1 is plain sampling: no λ meets b when the reference's mean safety misses it
    r = await post(app, {**CHAT, "alignment": {"strategy": "best_of_n", "n": 1,
                                               "cost_weight": "auto"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "constraint_infeasible"
    assert r.json()["error"]["param"] == "alignment.n"


async def test_auto_soft_best_of_n_selects_at_beta(tmp_path):
    app = make_app(FakeEngine(seed=5, full_length=True), dual=dual_file(tmp_path))
    r = await post(app, {**CHAT, "alignment": {"strategy": "soft_best_of_n", "n": 4,
                                               "cost_weight": "auto",
                                               "selection_temperature": 2.0}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "alignment.selection_temperature"
    from server.constraint import served, with_rule_options

    dual = load_solution(dual_file(tmp_path))
    a = with_rule_options(_alignment("soft_best_of_n", 4), dual)
    s = served(a, dual)
    assert a.selection_temperature == 0.5 and s.lam == 2.5  # β and λ* of the dual
    assert s.report["tilted_safety"] == -0.2 and s.warnings  # no reference: n not predicted
    r = await post(app, {**CHAT, "alignment": {"strategy": "soft_best_of_n", "n": 4,
                                               "cost_weight": "auto",
                                               "selection_temperature": 0.5}})
    assert r.status_code == 200 and r.json()["alignment"]["cost_weight"] == 2.5


def test_auto_soft_best_of_n_predicts_its_safety_and_ess_from_the_reference(tmp_path):
    from server.constraint import served

    rr, gg = synthetic(prompts=5, samples=8)
    dual = load_solution(dual_file(tmp_path, reference={"rewards": rr.tolist(),
                                                        "safety": gg.tolist()}))
    rep = served(_alignment("soft_best_of_n", 4, selection_temperature=0.5), dual).report
    lo, hi = rep["predicted_safety_interval"]
    assert lo <= rep["predicted_safety"] <= hi and 1.0 <= rep["selection_ess"] <= 4.0
    assert rep["selection_temperature"] == 0.5
    again = served(_alignment("soft_best_of_n", 4, selection_temperature=0.5), dual).report
    assert again == rep  # memoised, seeded


def test_sampling_and_policy_warnings():
    from decoding.types import Sampling
    from server.constraint import constraint_report, stale_policy_warnings

    rec = {"model": "fake", "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
           "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
           "max_tokens": 8}
    dual = DualSolution(2.5, 0.5, -0.2, "good_count", "bad_count", -0.2, -0.6, 4, 8, True,
                        sampling=rec, best_of_n={8: {"lambda": 2.5, "predicted_safety": -0.2,
                                                     "interval": [-0.25, -0.15]}})
    a = _alignment("best_of_n")
    report, warnings = constraint_report(a, dual, Sampling(max_tokens=8), "fake")
    assert report["lambda"] == 2.5 and report["predicted_safety_interval"] == [-0.25, -0.15]
    assert warnings == []
    _, warnings = constraint_report(a, dual, Sampling(max_tokens=16, temperature=0.7,
                                                      repetition_penalty=1.2), "fake")
    assert len(warnings) == 1
    for field in ("max_tokens 16", "temperature 0.7", "repetition_penalty 1.2"):
        assert field in warnings[0]
    _, warnings = constraint_report(a, dual, Sampling(max_tokens=8), "other-model")
    assert "model 'other-model'" in warnings[0]
    assert constraint_report(None, dual, Sampling(max_tokens=8), "fake") == (None, [])
    assert stale_policy_warnings(a, dual, "base") == []
    assert "stale" in stale_policy_warnings(a, dual, "safedpo-1")[0]
    assert stale_policy_warnings(None, dual, "safedpo-1") == []


def test_dual_cli_stores_rule_lambdas_sampling_and_reference(tmp_path, capsys):
    from cli.main import main
    from decoding.dual_rules import bon_safety, solve_bon

    r, g = synthetic(prompts=6, samples=8)
    write_rollouts(tmp_path, r, -g)
    b = g.mean() + 0.5 * (achievable_safety(g) - g.mean())
    assert main(["dual", "--rollouts", str(tmp_path), "--beta", "0.5", "--threshold", str(b),
                 "--bon-n", "1,4,8"]) == 0
    sol = load_solution(tmp_path / "dual.json")
    assert set(sol.best_of_n) == {1, 4, 8}
    assert sol.best_of_n[1]["lambda"] is None  # plain sampling cannot meet b
    # default: λ meets b at 95 % one-sided bootstrap confidence over the reference prompts
    sure = solve_bon(r, g, 8, b, confidence=0.95)
    assert sol.bon_confidence == 0.95 and sol.best_of_n[8]["confidence"] == 0.95
    assert sol.best_of_n[8]["lambda"] == pytest.approx(sure.lam)
    assert sol.best_of_n[8]["lower_bound"] == pytest.approx(sure.lower_bound) and sure.lower_bound >= b
    assert bon_safety(r, g, 8, sol.best_of_n[8]["lambda"]) >= b
    assert np.allclose(sol.reference["rewards"], r) and np.allclose(sol.reference["safety"], g)
    assert sol.sampling == {"model": "m", "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                            "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                            "repetition_penalty": 1.0, "max_tokens": 8}
    assert "best-of-8: λ =" in capsys.readouterr().out
    assert main(["dual", "--rollouts", str(tmp_path), "--beta", "0.5", "--threshold", str(b),
                 "--no-reference", "--out", str(tmp_path / "d2.json")]) == 0
    assert load_solution(tmp_path / "d2.json").reference is None
    assert main(["dual", "--rollouts", str(tmp_path), "--beta", "0.5", "--threshold", str(b),
                 "--confidence", "0", "--out", str(tmp_path / "d3.json")]) == 0
    exact = load_solution(tmp_path / "d3.json")
    assert exact.bon_confidence == 0.0 and "lower_bound" not in exact.best_of_n[8]
    assert exact.best_of_n[8]["lambda"] == pytest.approx(solve_bon(r, g, 8, b).lam)
    assert exact.best_of_n[8]["lambda"] < sure.lam
    assert main(["dual", "--rollouts", str(tmp_path), "--beta", "0.5", "--threshold", str(b),
                 "--bon-n", "0"]) == 2
