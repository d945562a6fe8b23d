"""95% intervals of `alignserve eval` (decoding/intervals.py), against hand-computed values:
Wilson score intervals, Student t quantiles, and the clustering by prompt."""

import math

import pytest

from decoding.intervals import (
    Z95,
    cluster_moments,
    effective_n,
    mean_interval,
    ratio_interval,
    t_quantile,
    wilson,
)
from evaluation.metrics import Row, summarize, win_outcomes, win_rate

Z2 = Z95**2  # 3.841459


def test_wilson_by_hand():
    # all successes: lower end n/(n + z²); no success: upper end z²/(n + z²)
    assert wilson(1.0, 15) == pytest.approx((15 / (15 + Z2), 1.0))
    assert wilson(1.0, 15)[0] == pytest.approx(0.79611, abs=1e-5)  # 15/15 reads [0.80, 1]
    assert wilson(0.0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson(0.75, 4) == pytest.approx((0.30064, 0.95441), abs=1e-5)
    # p̂ = ½ on 3: centre ½, half-width z·√(1/12 + z²/36)/(1 + z²/3) = 0.374666
    assert wilson(0.5, 3) == pytest.approx((0.5 - 0.374666, 0.5 + 0.374666), abs=1e-6)
    assert wilson(0.5, 0) is None


def test_t_quantiles():
    assert t_quantile(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(3) == pytest.approx(3.18245, abs=1e-5)
    assert t_quantile(29) == pytest.approx(2.04523, abs=1e-5)
    assert t_quantile(10**7) == pytest.approx(Z95, abs=1e-6)


def test_mean_interval_with_one_value_per_prompt_is_the_t_interval():
    # 1, 2, 3, 4: mean 2.5, s = 1.290994, s/√4 = 0.645497, t₃ = 3.182446
    lo, hi = mean_interval([[1.0], [2.0], [3.0], [4.0]])
    assert (lo, hi) == pytest.approx((2.5 - 2.054260, 2.5 + 2.054260), abs=1e-5)
    assert mean_interval([[1.0]]) is None and mean_interval([]) is None
    assert mean_interval([[2.0], [2.0]]) == (2.0, 2.0)  # no spread: a point


def test_mean_interval_clusters_by_prompt():
    # equal clusters: exactly the t interval on the per-prompt means 2 and 6 (s/√2 = 2, t₁)
    lo, hi = mean_interval([[1.0, 3.0], [5.0, 7.0]])
    assert (lo, hi) == pytest.approx((4 - 2 * 12.7062, 4 + 2 * 12.7062), abs=1e-3)
    # unequal clusters by hand: N = 4, ȳ = ½, residuals yᵢ − ȳ·nᵢ = ½, −½ → Var = 2·½/16
    est, var, m, n = cluster_moments([[1.0, 0.0, 1.0], [0.0]])
    assert (est, var, m, n) == (0.5, 0.0625, 2, 4)
    assert cluster_moments([[], []]) is None


def test_ratio_interval_counts_prompts_when_answers_agree_within_them():
    # 3 prompts × 2: Var = 3/2·(1 + 1 + 0)/36 = 1/12, n_eff = ¼/(1/12) = 3 (not 6 answers)
    groups = [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    assert effective_n(groups) == pytest.approx(3.0)
    assert ratio_interval(groups) == pytest.approx(wilson(0.5, 3))
    assert ratio_interval(groups)[0] < wilson(0.5, 6)[0]  # wider than the unclustered one
    # one answer per prompt: the plain Wilson interval on the answers
    assert ratio_interval([[1.0], [0.0], [1.0], [1.0]]) == pytest.approx(wilson(0.75, 4))
    # all harmless: no spread to measure the clustering by → prompts are counted
    assert effective_n([[1.0, 1.0], [1.0, 1.0]]) == 2
    assert ratio_interval([[1.0, 1.0], [1.0, 1.0]])[0] == pytest.approx(2 / (2 + Z2))
    # every prompt ½: no between-prompt variance → all answers count
    assert effective_n([[1.0, 0.0], [0.0, 1.0]]) == 4
    # unequal clusters: n_eff = ¼ / 0.0625 = 4, within [m, N] = [2, 4]
    assert effective_n([[1.0, 0.0, 1.0], [0.0]]) == pytest.approx(4.0)
    assert ratio_interval([[1.0, 1.0, 0.0]]) == pytest.approx(wilson(2 / 3, 1))  # one prompt
    assert ratio_interval([]) is None


def _row(pid, k, reward, answer, strategy="best_of_n", cost=0.1):
    return Row(prompt_id=pid, kind="helpful", prompt="p", strategy=strategy, n=2, answer=answer,
               reward=reward, cost=cost, harmless=cost < 0.5, kl_bound=0.1, kl_estimate=None,
               generated_tokens=8, wall_s=0.1, sample=k)


def test_win_rate_compares_every_answer_with_every_base_answer_to_the_prompt():
    base = [_row("a", 0, 0.4, "b0", "none"), _row("a", 1, 0.2, "b1", "none")]
    rows = [_row("a", 0, 0.6, "x0"), _row("a", 1, 0.2, "x1")]
    # 0.6 beats 0.4 and 0.2; 0.2 loses to 0.4, ties 0.2 → (1 + 1 + 0 + ½) / 4
    assert win_outcomes(rows, base) == [[1.0, 1.0, 0.0, 0.5]]
    assert win_rate(rows, base) == 0.625
    assert win_rate(base, base) == 0.5  # the base against itself: exactly ½ for any K


def test_summary_with_two_samples_per_prompt():
    rows = [_row("a", 0, 0.6, "x0", cost=0.9), _row("a", 1, 0.2, "x1"),
            _row("b", 0, 0.5, "y0"), _row("b", 1, 0.3, "y1")]
    s = summarize(rows, None)
    assert (s["prompts"], s["answer_count"]) == (2, 4)
    assert s["harmless_ratio"] == 0.75 and s["mean_reward"] == pytest.approx(0.4)
    # per-prompt reward means 0.4 and 0.4: no between-prompt spread → a point interval
    assert s["mean_reward_ci"] == pytest.approx([0.4, 0.4])
    # harmless per prompt ½ and 1: Var = 2·((1 − 1.5)² + (2 − 1.5)²)/16 = 1/16, n_eff = 3
    assert s["harmless_ratio_ci"] == pytest.approx(list(wilson(0.75, 3)))
    assert s["win_rate"] is None and s["win_rate_ci"] is None
    assert s["tokens_per_prompt"] == 8 and s["mean_kl_estimate_ci"] is None
    assert math.isclose(s["mean_kl_bound_ci"][0], 0.1)
