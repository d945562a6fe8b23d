"""95% intervals for the evaluation's ratios and means, clustered by prompt. Pure (math + scipy's
t quantile); imports neither vllm nor fastapi. In decoding/ because the evaluation and the
fine-tuning KL tracker (finetune/kl_track.py) both use it, and finetune sits below evaluation.

Answers are grouped by prompt: with `--samples K` the K answers to one prompt are not
independent (a prompt that provokes an offensive answer tends to provoke several), so the
unit of replication is the prompt, and every interval is clustered by it.

- Means (reward, cost, KL, tokens, win rate): the cluster-robust (sandwich) variance of the
  ratio estimator ȳ = Σᵢ yᵢ / Σᵢ nᵢ over m prompts, yᵢ the sum of prompt i's nᵢ values:
  Var = m/(m−1) · Σᵢ (yᵢ − ȳ·nᵢ)² / N², with a Student t on m − 1 degrees of freedom. With
  equal nᵢ it is exactly the t interval on the m per-prompt means; with one answer per prompt,
  the ordinary t interval. One prompt (m = 1): no interval.
- Ratios (harmless ratio): the Wilson score interval (Wilson 1927), which stays inside [0, 1]
  and is not degenerate at 0 or 1 (15 of 15 harmless reads [0.80, 1], not [1, 1]). Clustered
  through the effective sample size n_eff = p̂(1 − p̂) / Var (Var as above), kept within
  [m, N]: the design effect of K answers per prompt is at most K. Without variance to measure
  the clustering by (p̂ = 0 or 1, or a single prompt) n_eff = m: prompts are counted, not
  answers. With one answer per prompt, n_eff = N: the plain Wilson interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # standard normal 0.975 quantile
LEVEL = 0.95

Interval = tuple[float, float]


def wilson(p_hat: float, n: float, z: float = Z95) -> Interval | None:
    """Wilson score interval for a proportion p̂ observed on n (possibly effective) trials."""
    if n <= 0:
        return None
    z2n = z * z / n
    centre = (p_hat + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p_hat * (1 - p_hat) / n + z2n / (4 * n)) / (1 + z2n)
    return max(0.0, centre - half), min(1.0, centre + half)


def t_quantile(df: int, level: float = LEVEL) -> float:
    """Two-sided Student t quantile, e.g. 12.706 for df = 1, 1.960 as df → ∞."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def cluster_moments(groups: Sequence[Sequence[float]]) -> tuple[float, float | None, int, int] | None:
    """(estimate Σy/N, cluster-robust variance or None for m < 2, m prompts, N values) over the
    non-empty groups; None when there are no values at all."""
    groups = [g for g in groups if len(g)]
    m, n_total = len(groups), sum(len(g) for g in groups)
    if not n_total:
        return None
    est = math.fsum(math.fsum(g) for g in groups) / n_total
    if m < 2:
        return est, None, m, n_total
    resid = math.fsum((math.fsum(g) - est * len(g)) ** 2 for g in groups)
    return est, m / (m - 1) * resid / n_total**2, m, n_total


def mean_interval(groups: Sequence[Sequence[float]]) -> Interval | None:
    """95% interval of the mean of all values, clustered by group (see the module docstring)."""
    moments = cluster_moments(groups)
    if moments is None:
        return None
    est, var, m, _ = moments
    if var is None:  # one group: no spread between prompts to go on
        return None
    half = t_quantile(m - 1) * math.sqrt(var)
    return est - half, est + half


def effective_n(groups: Sequence[Sequence[float]]) -> float | None:
    """Wilson's n for 0/1 values clustered by group: p̂(1 − p̂)/Var within [m, N]."""
    moments = cluster_moments(groups)
    if moments is None:
        return None
    p_hat, var, m, n_total = moments
    if var is None:
        return float(m)
    if var <= 0:  # every prompt has the same share: all 0s or all 1s carry no clustering signal
        return float(m) if p_hat in (0.0, 1.0) else float(n_total)
    return min(float(n_total), max(float(m), p_hat * (1 - p_hat) / var))


def ratio_interval(groups: Sequence[Sequence[float]]) -> Interval | None:
    """95% Wilson interval of the share of 1s among 0/1 values, clustered by group."""
    moments = cluster_moments(groups)
    n = effective_n(groups)
    if moments is None or n is None:
        return None
    return wilson(moments[0], n)
