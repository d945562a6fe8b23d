"""Calibrated rewards, ensemble aggregations and the answer's win-rate estimate (pure numpy).

**Calibrated reward** (Beirami et al. 2024; InfAlign, Balashankar et al. 2025, its definition of
the calibrated reward): C(x, y) = P_{z∼p}[r(x,z) < r(x,y)] + ½·P_{z∼p}[r(x,z) = r(x,y)].
Given m i.i.d. candidates y₁..y_m for the same prompt, `loo_quantiles` estimates C(x, yᵢ) by
the fraction of the *other* m − 1 candidates that yᵢ beats, ties halved (leave-one-out: yᵢ is
not compared with itself, so for i.i.d. candidates the estimate is unbiased for C(x, yᵢ)).
C is invariant to any increasing transform of r, which is why members on different scales
(a cosine in [−1, 1], a logit, a probability) can be combined once calibrated, and why a
calibrated reward and a calibrated cost combine unit-free in r − λ·cost.

Why quantiles and not z-scores: a z-score still depends on the scorer's scale shape (one
outlier candidate moves every other z-score, a logit and a probability of the same judgement
give different z-scores), and its range is unbounded, so `min` and `mean − k·std` over members
would be dominated by whichever member has the heaviest tail. Quantiles are bounded in [0, 1],
identical for r and any monotone f(r), and are what InfAlign shows best-of-n actually optimises.
The price: only the order among the candidates scored together survives, so the scores are
relative to that set (`relative` scorers; runtime/ensemble.py).

**Aggregations** over ensemble members (rows = members, columns = candidates, calibrated):
`mean`; `median`; `min` (worst-case optimisation, WCO) and `mean_minus_std` = mean − k·std
across members (uncertainty-weighted optimisation, UWO) from Coste et al. 2024, "Reward Model
Ensembles Help Mitigate Overoptimization" (ICLR 2024, §3, Eqs. for WCO and UWO). Coste et al.
penalise the *variance* with a coefficient λ; here the penalty is the standard deviation (the
population std over members, ddof = 0), which is in the same unit as the mean, so k is a
number of standard deviations — a reconstruction, not the paper's exact UWO.

**Win rate of the returned answer** (`win_rate`): the estimated probability that the answer
beats a fresh sample of the policy under the objective. If the answer is the candidate of
(mid-)rank k among n i.i.d. candidates (k = 1 + the number of others it beats, ties halved),
then F(score) — its calibrated reward — is distributed as the k-th order statistic of n
uniforms, Beta(k, n + 1 − k), with mean k/(n + 1). So the estimate is k/(n + 1) and the
interval the Beta's central 95 %. This is exact for a rule that picks a fixed rank from
continuous scores (best-of-n: k = n, E = n/(n+1), the `win_rate_bound`, attained); for rules
whose pick depends on the score values too (soft best-of-n, nash) it is the distribution given
the rank, an approximation; ties (discrete scorers) make it approximate as well. The plain
fraction of the other candidates beaten is reported too (`win_rate_beaten`): it is biased
upwards by selection (it is 1 for every best-of-n answer without ties), hence not the estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

AGGREGATIONS = ("mean", "median", "min", "mean_minus_std")


def loo_quantiles(scores: Sequence[float]) -> list[float]:
    """Leave-one-out calibrated scores: for each candidate, the fraction of the others it
    beats, ties counted ½. One candidate alone: ½ (it beats a fresh draw half the time)."""
    s = np.asarray(scores, dtype=float)
    if np.isnan(s).any():
        raise ValueError("cannot calibrate NaN scores")
    m = len(s)
    if m == 1:
        return [0.5]
    wins = (s[:, None] > s[None, :]).sum(axis=1)
    ties = (s[:, None] == s[None, :]).sum(axis=1) - 1  # minus itself
    return [float(x) for x in (wins + 0.5 * ties) / (m - 1)]


def aggregate(calibrated: Sequence[Sequence[float]], how: str, k: float = 1.0) -> list[float]:
    """Combine members' calibrated scores, rows = members, columns = candidates."""
    a = np.asarray(calibrated, dtype=float)  # [members, candidates]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError("aggregate needs a [members, candidates] array with ≥ 1 member")
    if how == "mean":
        out = a.mean(axis=0)
    elif how == "median":
        out = np.median(a, axis=0)
    elif how == "min":
        out = a.min(axis=0)
    elif how == "mean_minus_std":
        out = a.mean(axis=0) - k * a.std(axis=0)
    else:
        raise ValueError(f"unknown aggregation {how!r}; one of {', '.join(AGGREGATIONS)}")
    return [float(x) for x in out]


@dataclass(frozen=True)
class WinRate:
    estimate: float  # k/(n+1)
    low: float  # Beta(k, n+1−k) 2.5 % quantile
    high: float  # 97.5 %
    beaten: float  # fraction of the other candidates beaten (ties ½); biased by selection

    def fields(self) -> dict[str, object]:
        """The answer's `alignment` fields."""
        return {"win_rate_estimate": self.estimate,
                "win_rate_interval": [self.low, self.high],
                "win_rate_beaten": self.beaten}


def win_rate(scores: Sequence[float], chosen: int, level: float = 0.95) -> WinRate:
    """Win-rate estimate of candidate `chosen` against a fresh policy sample (module docstring)."""
    n = len(scores)
    if not 0 <= chosen < n:
        raise IndexError(f"chosen {chosen} is not one of {n} candidates")
    beaten = loo_quantiles(scores)[chosen] if n > 1 else 0.5
    k = 1.0 + beaten * (n - 1)  # mid-rank, 1..n
    low, high = _beta_interval(k, n + 1 - k, level)
    return WinRate(k / (n + 1), low, high, beaten)


def _beta_interval(a: float, b: float, level: float) -> tuple[float, float]:
    """Central `level` interval of Beta(a, b) for a, b ≥ 1 (always so here: 1 ≤ k ≤ n), from
    its CDF integrated on a fine grid (the density is bounded for a, b ≥ 1; error < 1e-5 up
    to n in the thousands). numpy only: scipy's import would stall the server's event loop
    for half a second on the first request."""
    x = np.linspace(0.0, 1.0, 20_001)
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_pdf = log_norm + (a - 1) * np.log(x) + (b - 1) * np.log1p(-x)
    pdf = np.exp(np.nan_to_num(log_pdf, nan=-np.inf))  # 0·log 0 at the ends: the density's limit
    if a == 1:
        pdf[0] = math.exp(log_norm)
    if b == 1:
        pdf[-1] = math.exp(log_norm)
    cdf = np.concatenate([[0.0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * (x[1] - x[0]))])
    cdf /= cdf[-1]
    tail = (1.0 - level) / 2
    lo, hi = np.interp([tail, 1.0 - tail], cdf, x)
    return float(lo), float(hi)
