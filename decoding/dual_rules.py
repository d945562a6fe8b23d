"""The safety constraint under the rule actually served (numpy only).

CAN's λ* (decoding/dual.py) makes the *tilted* policy π_λ ∝ p·exp((r + λ·g)/β) meet E[g] ≥ b.
The server does not always serve π_λ: best-of-n returns the argmax of r + λ·g among n draws, a
different policy whose safety can fall well below b at λ* (a one-prompt example: p(A) = 0.1 with
r = 1, g = −1, p(B) = 0.9 with r = g = 0, β = 0.1, b = −0.3 gives λ* ≈ 0.865, and best-of-8 by
r + λ*·g returns A whenever one is drawn: E[g] = −(1 − 0.9⁸) ≈ −0.57). So each rule gets its own λ,
solved on the same reference samples (DESIGN-NOTES §4, "Constraints under the rule actually
served"):

- **best-of-n**: E_BoN[g](λ) = mean_i Σ_k w_ik⁽ⁿ⁾(λ)·g_ik with w⁽ⁿ⁾ the exact best-of-n law of the
  score r + λ·g over prompt i's K samples (decoding/bon_law.py). λ_BoN(n) is the smallest λ ≥ 0
  with E_BoN[g](λ) ≥ b.
  *Piecewise constant and non-decreasing in λ* (our derivation): the law depends on λ only through
  each prompt's order of scores, which changes only where two samples' scores cross, at
  λ_jk = (r_k − r_j)/(g_j − g_k) > 0. Samples tied at such a point are ordered by g descending just
  before it and ascending just after; the rank weights (k/K)ⁿ − ((k−1)/K)ⁿ increase with the rank,
  so by the rearrangement inequality Σ w·g can only grow. Hence a bisection over the sorted
  breakpoints, evaluating on the open intervals between them (where no two scores tie in exact
  arithmetic, so rounding cannot change the order).
- **soft best-of-n** at selection temperature β with λ*: as n → ∞ it samples π_λ* itself, so
  λ* is its λ; at finite n its safety is estimated by simulating the rule on the reference
  samples (seeded), with the mean effective sample size 1/Σw² of its selection weights.
- Other selection rules (speculative rejection, blockwise CD) are not simulated here.

The constraint is an average over prompts (the mean of the per-prompt expectations), not a
per-answer guarantee: single answers may be unsafe, and prompts unlike the reference prompts may
fall below b. `bootstrap_interval` resamples prompts for the predicted mean's uncertainty.

**Confidence** (`solve_bon(confidence=c)`): λ tuned so that the mean over the *reference* prompts
meets b exactly is optimistic for new prompts (bench/results/dual.md: fresh prompts fell below b's
interval in 3 of 9 settings). With c > 0 the condition is instead that the one-sided c lower
bound of the mean, by a percentile bootstrap over prompts, reaches b. With the resampling indices
fixed (seeded), each resampled mean is a mean of per-prompt values that are non-decreasing in λ
(the argument above holds prompt by prompt), so each resampled mean is non-decreasing, and so is
any order statistic of them: the same bisection finds the smallest such λ. This is our
construction, not the paper's; it guards against prompt sampling, not against a shift in the
prompt distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bon_law import bon_law, bon_mean
from .dual import InfeasibleConstraint

# The served λ sits this far (relative) inside the first safe interval, never on its edge,
# where the reference samples' scores tie exactly and float rounding decides the order.
_INSIDE = 1e-6


def _arrays(rewards, safety) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rewards, dtype=np.float64)
    g = np.asarray(safety, dtype=np.float64)
    if r.ndim != 2 or r.shape != g.shape or r.size == 0:
        raise ValueError(f"rewards and safety must both be [prompts, samples], got "
                         f"{r.shape} and {g.shape}")
    if not (np.isfinite(r).all() and np.isfinite(g).all()):
        raise ValueError("rewards and safety must be finite")
    return r, g


def bon_safety_per_prompt(rewards, safety, n: int, lam: float) -> np.ndarray:
    """Σ_k w_ik⁽ⁿ⁾(λ)·g_ik per prompt [N]: best-of-n's expected safety by the score r + λ·g."""
    r, g = _arrays(rewards, safety)
    return bon_mean(r + lam * g, g, n)


def bon_safety(rewards, safety, n: int, lam: float) -> float:
    """E_BoN[g](λ): best-of-n's expected safety, averaged over prompts."""
    return float(bon_safety_per_prompt(rewards, safety, n, lam).mean())


def bon_safety_bound(rewards, safety, n: int, lam: float, confidence: float) -> float:
    """The one-sided `confidence` lower bootstrap bound of E_BoN[g](λ) over prompts, with the
    resampling `solve_bon` uses (confidence 0: the mean itself)."""
    r, g = _arrays(rewards, safety)
    return _Condition(r, g, n, 0.0, confidence).value(lam)


def breakpoints(rewards, safety) -> np.ndarray:
    """Sorted distinct λ > 0 where two samples of one prompt have equal r + λ·g."""
    r, g = _arrays(rewards, safety)
    dr = r[:, None, :] - r[:, :, None]  # [N, j, k] = r_k − r_j
    dg = g[:, :, None] - g[:, None, :]  # g_j − g_k
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = dr / dg
    iu = np.triu_indices(r.shape[1], 1)
    vals = lam[:, iu[0], iu[1]].ravel()
    return np.unique(vals[np.isfinite(vals) & (vals > 0)])


@dataclass(frozen=True)
class RuleLambda:
    """The λ a rule is served with and what it predicts on the reference samples."""

    lam: float
    predicted_safety: float  # mean over prompts at `lam`
    edge: float  # the breakpoint the safe interval starts at (lam sits just inside it)
    # the one-sided `confidence` lower bound of the mean at `lam` (None: solved on the mean)
    lower_bound: float | None = None


class _Condition:
    """E_BoN[g](λ) ≥ b on the mean (confidence 0) or on its bootstrap lower bound."""

    def __init__(self, r, g, n: int, threshold: float, confidence: float,
                 resamples: int = 2000, seed: int = 0) -> None:
        if not 0.0 <= confidence < 1.0:
            raise ValueError(f"confidence must lie in [0, 1), got {confidence}")
        self.r, self.g, self.n, self.b, self.c = r, g, n, threshold, confidence
        self.idx = (np.random.default_rng(seed).integers(0, r.shape[0], size=(resamples,
                                                                               r.shape[0]))
                    if confidence > 0 and r.shape[0] > 1 else None)

    def value(self, lam: float) -> float:
        per_prompt = bon_safety_per_prompt(self.r, self.g, self.n, lam)
        if self.idx is None:
            return float(per_prompt.mean())
        return float(np.quantile(per_prompt[self.idx].mean(axis=1), 1.0 - self.c))

    def holds(self, lam: float) -> bool:
        return self.value(lam) >= self.b

    def lower_bound(self, lam: float) -> float | None:
        return self.value(lam) if self.c > 0 else None


def solve_bon(rewards, safety, n: int, threshold: float, confidence: float = 0.0) -> RuleLambda:
    """λ_BoN(n) = the smallest λ ≥ 0 with E_BoN[g](λ) ≥ b (module docstring), or with its
    one-sided `confidence` bootstrap lower bound ≥ b when confidence > 0, served just inside the
    interval where that holds. Raises `InfeasibleConstraint` when even λ → ∞ (order by g, then
    r) misses b: e.g. n = 1 is plain sampling, whose safety no λ changes."""
    r, g = _arrays(rewards, safety)
    cond = _Condition(r, g, n, threshold, confidence)
    if cond.holds(0.0):
        return RuleLambda(0.0, bon_safety(r, g, n, 0.0), 0.0, cond.lower_bound(0.0))
    bps = breakpoints(r, g)
    if bps.size == 0:
        raise InfeasibleConstraint(cond.value(0.0), threshold)
    # points[m] lies inside the m-th interval: (0, bp_0), (bp_0, bp_1), ..., (bp_last, ∞)
    points = np.concatenate([[bps[0] / 2], (bps[:-1] + bps[1:]) / 2, [2 * bps[-1] + 1.0]])
    if not cond.holds(float(points[-1])):
        raise InfeasibleConstraint(cond.value(float(points[-1])), threshold)
    lo, hi = -1, len(points) - 1  # invariant: f(points[lo]) < b ≤ f(points[hi]) (lo = −1: λ = 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cond.holds(float(points[mid])):
            hi = mid
        else:
            lo = mid
    left = 0.0 if hi == 0 else float(bps[hi - 1])
    right = float(bps[hi]) if hi < len(bps) else np.inf
    step = _INSIDE * (left if left > 0 else right)
    lam = left + min(step, (right - left) / 2)
    return RuleLambda(lam, bon_safety(r, g, n, lam), left, cond.lower_bound(lam))


def tilted_safety_per_prompt(rewards, safety, beta: float, lam: float) -> np.ndarray:
    """E_{π_λ}[g] per prompt: samples weighted by softmax_k((r_ik + λ·g_ik)/β)."""
    r, g = _arrays(rewards, safety)
    z = (r + lam * g) / beta
    w = np.exp(z - z.max(axis=1, keepdims=True))
    return (w * g).sum(axis=1) / w.sum(axis=1)


def soft_bon_simulation(rewards, safety, n: int, beta: float, lam: float, draws: int = 512,
                        seed: int = 0) -> tuple[np.ndarray, float]:
    """Soft best-of-n (pick candidate i w.p. softmax(score_i/β)) over n draws with replacement
    from each prompt's K samples, simulated `draws` times (seeded). Returns the per-prompt
    expected safety [N] (exact given the draws: Σ softmax·g, no second sampling) and the mean
    effective sample size 1/Σw² of the selection weights (1: as greedy as best-of-n; n: uniform)."""
    r, g = _arrays(rewards, safety)
    idx = np.random.default_rng(seed).integers(0, r.shape[1], size=(r.shape[0], draws, n))
    rows = np.arange(r.shape[0])[:, None, None]
    z = (r[rows, idx] + lam * g[rows, idx]) / beta  # [N, draws, n]
    w = np.exp(z - z.max(axis=2, keepdims=True))
    w /= w.sum(axis=2, keepdims=True)
    per_prompt = (w * g[rows, idx]).sum(axis=2).mean(axis=1)
    return per_prompt, float((1.0 / (w * w).sum(axis=2)).mean())


def bootstrap_interval(per_prompt, level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap over prompts of the mean of `per_prompt` (seeded): the uncertainty
    of a prediction that averages over N reference prompts. λ is held fixed."""
    v = np.asarray(per_prompt, dtype=np.float64)
    if v.size == 1:
        return float(v[0]), float(v[0])
    means = v[np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))].mean(1)
    tail = (1.0 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def bon_entry(rewards, safety, n: int, threshold: float, confidence: float = 0.0) -> dict:
    """{"lambda", "predicted_safety", "interval", "edge"} (+ "lower_bound" and "confidence"
    when confidence > 0) for best-of-n; {"lambda": None, "reachable": ...} when no λ serves n
    (with confidence > 0, "reachable" is the lower bound at λ → ∞)."""
    try:
        sol = solve_bon(rewards, safety, n, threshold, confidence)
    except InfeasibleConstraint as exc:
        return {"lambda": None, "reachable": float(exc.achievable)}
    lo, hi = bootstrap_interval(bon_safety_per_prompt(rewards, safety, n, sol.lam))
    entry = {"lambda": sol.lam, "predicted_safety": sol.predicted_safety, "interval": [lo, hi],
             "edge": sol.edge}
    if sol.lower_bound is not None:
        entry.update(lower_bound=sol.lower_bound, confidence=confidence)
    return entry


def bon_table(rewards, safety, threshold: float, ns, confidence: float = 0.0) -> dict[int, dict]:
    """`bon_entry` for each n (what `alignserve dual` stores)."""
    return {n: bon_entry(rewards, safety, n, threshold, confidence)
            for n in sorted({int(x) for x in ns})}


__all__ = ["RuleLambda", "bon_entry", "bon_law", "bon_safety", "bon_safety_bound",
           "bon_safety_per_prompt", "bon_table",
           "bootstrap_interval", "breakpoints", "soft_bon_simulation", "solve_bon",
           "tilted_safety_per_prompt"]
