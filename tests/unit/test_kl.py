import math

import pytest

from decoding.kl import bon_kl_bound, bon_kl_estimate, bon_win_rate_bound, selection_kl_bound


def exact_bon_kl(p_sorted_by_reward: list[float], n: int) -> float:
    """KL(π⁽ⁿ⁾‖p) for a discrete p with distinct rewards: π⁽ⁿ⁾(yᵢ) = F(i)ⁿ − F(i−1)ⁿ."""
    kl, cdf = 0.0, 0.0
    for p in p_sorted_by_reward:
        pi = (cdf + p) ** n - cdf**n
        if pi > 0:
            kl += pi * math.log(pi / p)
        cdf += p
    return kl


def naive_estimate(n: int, eps: float) -> float:
    a = (1 - eps) ** n
    return a * (math.log(n) + (n - 1) * math.log(1 - eps) - (n - 1) / n) + (1 - a) * math.log(
        (1 - a) / eps)


def test_bounds_hand_checked():
    assert bon_kl_bound(1) == 0.0
    assert bon_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl_bound(8) == pytest.approx(2.0794415 - 0.875, abs=1e-6)
    assert bon_win_rate_bound(1) == 0.5
    assert bon_win_rate_bound(4) == 0.8
    assert selection_kl_bound(16) == pytest.approx(math.log(16))
    with pytest.raises(ValueError):
        bon_kl_bound(0)


@pytest.mark.parametrize("n", [2, 4, 8, 64])
@pytest.mark.parametrize("eps", [0.9, 0.5, 0.1, 1e-3, 1e-8])
def test_estimate_matches_the_formula_where_it_is_representable(n, eps):
    assert bon_kl_estimate(n, math.log(eps)) == pytest.approx(naive_estimate(n, eps), rel=1e-9)


@pytest.mark.parametrize("n", [2, 8, 32])
def test_estimate_is_stable_for_long_answers(n):
    # log ε of a 500-token answer: ε underflows in linear space, KL̂ must tend to the bound.
    for log_eps in (-50.0, -745.0, -1e4, -1e300):
        value = bon_kl_estimate(n, log_eps)
        assert math.isfinite(value)
        assert value == pytest.approx(bon_kl_bound(n), abs=1e-12)


def test_estimate_edges_and_monotonicity():
    assert bon_kl_estimate(1, -3.0) == 0.0
    assert bon_kl_estimate(8, 0.0) == 0.0  # a certain answer: selection changes nothing
    values = [bon_kl_estimate(8, math.log(e)) for e in (0.99, 0.5, 0.1, 0.01)]
    assert values == sorted(values)  # rarer answer → more KL
    assert all(v <= bon_kl_bound(8) + 1e-12 for v in values)
    with pytest.raises(ValueError):
        bon_kl_estimate(4, 0.5)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("eps", [0.5, 0.2, 0.05])
def test_estimate_equals_exact_kl_when_the_best_answer_has_mass_eps(n, eps):
    # Beirami et al.'s setting: the best outcome has probability ε, the rest is spread thin.
    m = 2000
    p = [(1 - eps) / m] * m + [eps]
    exact = exact_bon_kl(p, n)
    assert exact <= bon_kl_bound(n)
    assert bon_kl_estimate(n, math.log(eps)) == pytest.approx(exact, rel=1e-3)


def test_bound_holds_for_exact_kl_on_random_distributions():
    import random

    rng = random.Random(1)
    for n in (2, 3, 8, 20):
        for _ in range(20):
            w = [rng.random() for _ in range(7)]
            p = [x / sum(w) for x in w]
            assert exact_bon_kl(p, n) <= bon_kl_bound(n) + 1e-12


def test_tilt_step_bound_holds_for_random_discrete_tilts():
    """KL(p·e^{λQ}/Z ‖ p) ≤ min(λR, λ²R²/8) for Q in an interval of width R (Hoeffding's
    lemma; decoding/kl.py), on random p and Q, including Q at the ends of its range."""
    import random

    from decoding.kl import tilt_step_kl_bound

    rng = random.Random(0)
    worst = 0.0
    for _ in range(3000):
        k = rng.randint(1, 6)
        p = [rng.random() ** 3 + 1e-9 for _ in range(k)]
        p = [x / sum(p) for x in p]
        lo, width = rng.uniform(-3, 3), rng.choice([0.0, 0.1, 1.0, 4.0])
        q = [rng.choice([lo, lo + width, rng.uniform(lo, lo + width)]) for _ in range(k)]
        lam = rng.choice([0.0, 0.05, 0.5, 2.0, 20.0])
        w = [pi * math.exp(lam * (qi - lo)) for pi, qi in zip(p, q)]
        pi_ = [x / sum(w) for x in w]
        kl = sum(a * math.log(a / b) for a, b in zip(pi_, p) if a > 0)
        bound = tilt_step_kl_bound(lam, width)
        assert kl <= bound + 1e-12
        worst = max(worst, kl / bound if bound else 0.0)
    assert worst > 0.5  # the bound is not vacuous: some tilts come close
    assert tilt_step_kl_bound(1.0, 2.0) == pytest.approx(0.5)  # λ²R²/8 < λR
    assert tilt_step_kl_bound(10.0, 2.0) == pytest.approx(20.0)  # λR < λ²R²/8
    with pytest.raises(ValueError):
        tilt_step_kl_bound(-1.0, 1.0)


def test_missing_logprobs_have_no_log_eps():
    from decoding.kl import sample_log_prob

    assert sample_log_prob([1, 2], [-0.5, -0.25]) == pytest.approx(-0.75)
    assert sample_log_prob([1, 2], []) is None  # an engine that returned none
    assert sample_log_prob([1, 2], [-0.5]) is None
    assert sample_log_prob([1], [float("nan")]) is None
    assert sample_log_prob([1], [1e-12]) == 0.0  # rounding above 0 is clamped
