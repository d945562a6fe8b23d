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

ε comes from the sample's per-token log-probs. An engine that returned none (or fewer than the
tokens) gives no ε: `sample_log_prob` is then None and so is the estimate — never a silent 0,
which is what Σ over an empty list would claim (ε = 1: "selection changed nothing").

Tokenwise tilts (controlled decoding, Mudgal et al. 2024, arXiv 2310.17022): for
π ∝ p·e^{λQ} with Q ∈ [a, a + R], KL(π‖p) = λ·E_π Q − log E_p e^{λQ} ≤ λ·R (the log-ratio
λQ − log E_p e^{λQ} never exceeds λ·(max Q − min Q)), and, since d/ds KL(π_s‖p) = s·Var_{π_s}(Q)
with Var ≤ R²/4 (Popoviciu), KL(π‖p) = ∫₀^λ s·Var_{π_s}(Q) ds ≤ λ²R²/8 (the bound of Hoeffding's
lemma, 1963). `tilt_step_kl_bound` is the smaller of the two.
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


def tilt_step_kl_bound(lam: float, value_range: float) -> float:
    """min(λR, λ²R²/8): KL(π‖p) for π ∝ p·e^{λQ} when Q lies in an interval of width R
    (module docstring). Holds for every p and every Q in the range, so it bounds each step of
    a tokenwise tilt whatever prefix the step continues."""
    if lam < 0 or value_range < 0 or math.isnan(lam) or math.isnan(value_range):
        raise ValueError(f"λ and R must be ≥ 0, got {lam}, {value_range}")
    x = lam * value_range
    return min(x, x * x / 8)


def sample_log_prob(token_ids, logprobs) -> float | None:
    """log ε = Σ log p(token) of a sample, or None when its log-probs are missing (fewer than
    its tokens, e.g. an engine that returned none) or not numbers: no estimate can be made."""
    if len(logprobs) != len(token_ids) or any(math.isnan(x) for x in logprobs):
        return None
    return min(0.0, math.fsum(logprobs))


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
