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
