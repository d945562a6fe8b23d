"""KL accounting for best-of-n style selection (Beirami et al. 2024, arXiv 2401.01879).

For π⁽ⁿ⁾, the best of n i.i.d. draws from p:
- KL(π⁽ⁿ⁾‖p) ≤ log n − (n−1)/n  (an upper bound, often misquoted as the KL itself);
- the win rate of π⁽ⁿ⁾ against p is at most n/(n+1);
- any rule that returns one of N i.i.d. draws has π(y) ≤ N·p(y), hence KL ≤ log N
  (soft best-of-n, speculative rejection).
The estimator uses ε = p(y|x) of the returned answer under the distribution actually sampled from:
    KL̂(ε) = (1−ε)ⁿ·[log n + (n−1)·log(1−ε) − (n−1)/n] + (1−(1−ε)ⁿ)·log((1−(1−ε)ⁿ)/ε).
Long answers have log ε in the hundreds below zero, so everything is done in log space.

Exactly, KL̂(ε) ≤ log n − (n−1)/n for every ε (it tends to the bound as ε → 0), but the two are
computed along different floating-point paths and KL̂ may come out one ulp above the bound.
The API must never report an estimate above its own bound, so every estimate is clamped to
[0, bound] (`within`): the clamp moves a value by rounding error only.
"""

from __future__ import annotations

import math


def bon_kl_bound(n: int) -> float:
    """log n − (n−1)/n."""
    _check_n(n)
    return math.log(n) - (n - 1) / n


def bon_win_rate_bound(n: int) -> float:
    """n/(n+1)."""
    _check_n(n)
    return n / (n + 1)


def selection_kl_bound(n: int) -> float:
    """log n: holds for any rule that returns one of n i.i.d. draws."""
    _check_n(n)
    return math.log(n)


def bon_kl_estimate(n: int, log_eps: float) -> float:
    """Beirami et al.'s KL̂ for best-of-n, from log ε = log p(chosen answer)."""
    _check_n(n)
    if log_eps > 0 or math.isnan(log_eps):
        raise ValueError(f"log_eps must be a log-probability (≤ 0), got {log_eps}")
    if n == 1:
        return 0.0
    log_1m_eps = _log1mexp(log_eps)  # log(1−ε)
    if log_1m_eps == -math.inf:  # ε = 1: the answer was certain; selection changes nothing
        return 0.0
    a = n * log_1m_eps  # log (1−ε)ⁿ
    big_a = math.exp(a)
    log_b = _log1mexp(a)  # log(1 − (1−ε)ⁿ)
    if log_b == -math.inf:  # ε underflowed to 0 relative to 1: KL̂ tends to the bound
        return bon_kl_bound(n)
    term1 = big_a * (math.log(n) + (n - 1) * log_1m_eps - (n - 1) / n)
    term2 = math.exp(log_b) * (log_b - log_eps)
    return within(term1 + term2, bon_kl_bound(n))


def within(estimate: float, bound: float) -> float:
    """`estimate` clamped to [0, bound]: a KL is never negative, and an estimate that exceeds
    the bound it is reported with does so by rounding only (see the module docstring)."""
    return min(max(0.0, estimate), bound)


def _log1mexp(x: float) -> float:
    """log(1 − eˣ) for x ≤ 0, accurate on the whole range (Mächler 2012)."""
    if x == 0:
        return -math.inf
    if x > -math.log(2):
        return math.log(-math.expm1(x))
    return math.log1p(-math.exp(x))


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
