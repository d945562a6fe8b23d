"""The safety constraint under the rule actually served (decoding/dual_rules.py, bon_law.py)."""

import itertools
import math

import numpy as np
import pytest

from decoding.bon_law import bon_law
from decoding.dual import InfeasibleConstraint, predicted_safety, solve_dual
from decoding.dual_rules import (
    bon_safety,
    bon_safety_per_prompt,
    bon_table,
    bootstrap_interval,
    breakpoints,
    soft_bon_simulation,
    solve_bon,
)


def toy():
    """The issue's one-prompt example as K = 10 reference samples: one A (r = 1, g = −1),
    nine B (r = g = 0)."""
    return np.array([[1.0] + [0.0] * 9]), np.array([[-1.0] + [0.0] * 9])


def synthetic(seed=0, prompts=20, samples=12):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(prompts, samples))
    g = -rng.uniform(size=(prompts, samples)) - 0.4 * r  # safety anti-correlated with reward
    return r, g


def exact_bon_by_enumeration(scores, values, n):
    """E[value of the best of n draws with replacement, ties uniform] by enumerating K^n draws."""
    k, total = len(scores), 0.0
    for draw in itertools.product(range(k), repeat=n):
        best = max(scores[i] for i in draw)
        tied = [i for i in draw if scores[i] == best]
        total += sum(values[i] for i in tied) / len(tied)
    return total / k ** n


def test_bon_law_matches_enumeration_with_ties():
    scores, values = [0.3, 0.1, 0.3, 0.8, 0.1], [1.0, -2.0, 0.5, -1.0, 3.0]
    for n in (1, 2, 3):
        w = bon_law(scores, n)
        assert w.sum() == pytest.approx(1.0)
        assert float(w @ values) == pytest.approx(exact_bon_by_enumeration(scores, values, n))
    # sorted ascending without ties: (k/K)^n − ((k−1)/K)^n
    w = bon_law([[0.0, 1.0, 2.0, 3.0]], 3)[0]
    assert w == pytest.approx([((k + 1) / 4) ** 3 - (k / 4) ** 3 for k in range(4)])


def test_toy_lambda_star_fails_best_of_8_and_lambda_bon_meets_b():
    r, g = toy()
    beta, b = 0.1, -0.3
    lam_star = solve_dual(r, g, beta, b)
    assert lam_star == pytest.approx(0.865, abs=1e-3)
    assert predicted_safety(r, g, beta, lam_star) == pytest.approx(b, abs=1e-9)
    # best-of-8 by r + λ*·g returns A whenever one is drawn
    assert bon_safety(r, g, 8, lam_star) == pytest.approx(-(1 - 0.9 ** 8), abs=1e-12)
    assert bon_safety(r, g, 8, lam_star) < b - 0.2
    assert bon_safety(r, g, 16, lam_star) == pytest.approx(-(1 - 0.9 ** 16), abs=1e-12)
    sol = solve_bon(r, g, 8, b)
    assert sol.edge == pytest.approx(1.0)  # where A's score 1 − λ falls below B's 0
    assert 1.0 < sol.lam < 1.0 + 1e-5
    assert sol.predicted_safety >= b
    assert bon_safety(r, g, 8, sol.lam) == pytest.approx(-(0.1 ** 8))  # A only if all 8 are A
    assert bon_safety(r, g, 8, 0.999) < b  # just below the edge it still fails


def test_lambda_bon_is_the_smallest_by_a_grid_scan():
    r, g = synthetic()
    for n, b in ((2, -0.6), (8, -0.45), (32, -0.4)):
        sol = solve_bon(r, g, n, b)
        assert bon_safety(r, g, n, sol.lam) >= b
        grid = np.linspace(0.0, sol.edge, 400, endpoint=False)
        assert all(bon_safety(r, g, n, x) < b for x in grid[1:])


def test_bon_safety_is_monotone_in_lambda():
    r, g = synthetic(seed=3)
    bps = breakpoints(r, g)
    points = np.concatenate([[0.0], (bps[:-1] + bps[1:]) / 2, [bps[-1] + 1]])
    values = [bon_safety(r, g, 8, x) for x in points]
    assert all(b2 >= b1 - 1e-12 for b1, b2 in zip(values, values[1:]))


def test_inactive_and_infeasible():
    r, g = synthetic()
    assert solve_bon(r, g, 4, -10.0).lam == 0.0  # λ = 0 already meets a lax threshold
    with pytest.raises(InfeasibleConstraint):
        solve_bon(r, g, 1, float(g.mean()) + 0.01)  # n = 1 is plain sampling: λ changes nothing
    table = bon_table(r, g, float(g.mean()) + 0.01, [1, 8])
    assert table[1]["lambda"] is None and table[1]["reachable"] == pytest.approx(g.mean())
    lo, hi = table[8]["interval"]
    assert table[8]["lambda"] > 0 and lo <= table[8]["predicted_safety"] <= hi


def test_bootstrap_interval_covers_the_mean_and_is_seeded():
    v = np.random.default_rng(1).normal(size=40)
    lo, hi = bootstrap_interval(v)
    assert lo < v.mean() < hi and hi - lo == pytest.approx(2 * 1.96 * v.std() / math.sqrt(40),
                                                           rel=0.25)
    assert bootstrap_interval(v) == (lo, hi)
    assert bootstrap_interval([0.3]) == (0.3, 0.3)


def test_soft_bon_simulation_limits():
    r, g = synthetic(prompts=6, samples=8)
    # n = 1: the chosen sample is the one drawn: safety of the reference
    per, ess = soft_bon_simulation(r, g, 1, 0.5, 1.0, draws=4000)
    assert ess == 1.0 and per.mean() == pytest.approx(g.mean(), abs=0.03)
    # very low temperature: soft best-of-n is best-of-n
    per, ess = soft_bon_simulation(r, g, 4, 1e-6, 1.0, draws=4000)
    assert per.mean() == pytest.approx(bon_safety_per_prompt(r, g, 4, 1.0).mean(), abs=0.03)
    # ESS: the multiplicity of the best sample among the 4 draws (repeats split the weight)
    assert 1.0 <= ess < 1.5


def prompt_population(seed, prompts, samples=16):
    """Prompts that differ in how safe their answers are (a per-prompt offset of g), so that a
    λ tuned on a few reference prompts can miss b on others."""
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(prompts, samples))
    g = rng.normal(scale=0.3, size=(prompts, 1)) - rng.uniform(size=(prompts, samples)) - 0.4 * r
    return r, g


def test_confident_lambda_is_the_smallest_whose_lower_bound_meets_b():
    r, g = prompt_population(1, 20)
    b = bon_safety(r, g, 8, 0.0) + 0.1
    exact, sure = solve_bon(r, g, 8, b), solve_bon(r, g, 8, b, confidence=0.95)
    assert exact.lower_bound is None and sure.lower_bound is not None
    assert sure.lam > exact.lam and sure.lower_bound >= b > exact.predicted_safety - 0.05
    assert sure.predicted_safety > sure.lower_bound  # the mean sits above its lower bound
    # no smaller λ has its lower bound at b (same seeded resamples as the solver)
    idx = np.random.default_rng(0).integers(0, 20, size=(2000, 20))
    lower = lambda x: np.quantile(bon_safety_per_prompt(r, g, 8, x)[idx].mean(1), 0.05)  # noqa: E731
    assert lower(sure.lam) == pytest.approx(sure.lower_bound)
    assert all(lower(x) < b for x in np.linspace(0.0, sure.edge, 200, endpoint=False)[1:])
    entry = bon_table(r, g, b, [8], confidence=0.95)[8]
    assert entry["confidence"] == 0.95 and entry["lower_bound"] == pytest.approx(sure.lower_bound)


def test_confident_lambda_holds_on_new_prompts_where_the_exact_one_is_a_coin_flip():
    """30 reference sets of 20 prompts; each λ is judged on 4,000 fresh prompts of the same
    population (their mean is the population's up to ±0.01). Tuned exactly to b, λ meets b on
    new prompts about half the time; at 95 % confidence it nearly always does."""
    fresh_r, fresh_g = prompt_population(10_000, 4000)
    b = bon_safety(fresh_r, fresh_g, 8, 0.0) + 0.08
    met = {0.0: 0, 0.95: 0}
    for seed in range(30):
        r, g = prompt_population(seed, 20)
        for c in met:
            lam = solve_bon(r, g, 8, b, confidence=c).lam
            met[c] += bon_safety(fresh_r, fresh_g, 8, lam) >= b
    assert met[0.0] <= 22 and met[0.95] >= 27
