"""CAN's dual: the optimal safety weight λ* from reference samples (numpy only).

Huang et al., "One-Shot Safety Alignment for Large Language Models via Optimal Dualization"
(CAN, arXiv 2405.19544). The constrained problem

    max_π E[r] − β·KL(π‖p)   subject to   E_π[g] ≥ b      (g: safety score, e.g. −cost)

has the dual function D(λ) = β·E_x log E_{y~p} exp((r + λ·(g − b))/β), smooth and convex in
λ ≥ 0; with λ* = argmin_{λ≥0} D the optimal policy is π_λ* ∝ p·exp((r + λ*·g)/β). From N prompts
× K reference samples the expectation over p becomes a mean over the K samples:

    D̂(λ) = β·mean_i log mean_k exp((r_ik + λ·(g_ik − b))/β)
    ∇D̂(λ) = mean_i Σ_k w_ik(λ)·(g_ik − b),   w_i = softmax_k((r_ik + λ·g_ik)/β)
    ∇²D̂(λ) = (1/β)·mean_i Cov_{w_i}(g_i)

The gradient is the (self-normalised) predicted constraint slack E_{π_λ}[g] − b, so λ* = 0 when
the unconstrained optimum π_0 ∝ p·exp(r/β) already satisfies the constraint (note: π_0, not the
reference p, since reward tilting alone may raise or lower safety), and otherwise
E_{π_λ*}[g] = b.

Arrays are [prompts, samples] for one constraint, or [prompts, samples, m] with a threshold of
shape [m] for m constraints (then λ is a vector of m weights).

Infeasible constraints: as λ → ∞ each prompt's weights concentrate on its safest samples, so
the largest safety any π_λ can reach is mean_i max_k g_ik. When the threshold is not strictly
below it, D̂ decreases without end and no finite λ* exists. `solve_dual` then raises
`InfeasibleConstraint` (carrying the achievable safety) rather than returning an arbitrary
large λ: a server that silently used "λ = 1e9" would discard the reward altogether and still
miss the constraint, which the caller should decide knowingly (lower b, draw more samples).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class InfeasibleConstraint(ValueError):
    """No λ ≥ 0 meets the constraint on these samples: D̂ decreases without bound."""

    def __init__(self, achievable: np.ndarray | float, threshold: np.ndarray | float) -> None:
        self.achievable, self.threshold = achievable, threshold
        super().__init__(
            f"constraint infeasible on these samples: the safest reachable mean safety is "
            f"{np.round(achievable, 6).tolist()} (every prompt's safest sample), not above the "
            f"threshold {np.round(threshold, 6).tolist()}; lower the threshold or draw more samples")


def _shape(rewards, safety, beta, threshold):
    """Validated float arrays r [N, K], s [N, K, m], b [m], and whether m was implicit (=1)."""
    r = np.asarray(rewards, dtype=np.float64)
    s = np.asarray(safety, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 1 or r.shape[1] < 1:
        raise ValueError(f"rewards must be [prompts, samples], got shape {r.shape}")
    scalar = s.ndim == 2
    if scalar:
        s = s[..., None]
    if s.ndim != 3 or s.shape[:2] != r.shape:
        raise ValueError(f"safety must be {r.shape} or {r.shape} + (m,), got {np.shape(safety)}")
    b = np.atleast_1d(np.asarray(threshold, dtype=np.float64))
    if b.shape != (s.shape[2],):
        raise ValueError(f"threshold must have shape ({s.shape[2]},), got {b.shape}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    if not (np.isfinite(r).all() and np.isfinite(s).all() and np.isfinite(b).all()):
        raise ValueError("rewards, safety and threshold must be finite")
    return r, s, b, scalar


def _lam(lam, m: int) -> np.ndarray:
    out = np.atleast_1d(np.asarray(lam, dtype=np.float64))
    if out.shape != (m,):
        raise ValueError(f"λ must have {m} component(s), got shape {out.shape}")
    return out


def _pieces(r, s, b, beta, lam):
    """D̂(λ), ∇D̂ [m] and ∇²D̂ [m, m] with a stable log-sum-exp."""
    z = (r + (s - b) @ lam) / beta  # [N, K]
    zmax = z.max(axis=1, keepdims=True)
    e = np.exp(z - zmax)
    tot = e.sum(axis=1, keepdims=True)
    w = e / tot  # [N, K] self-normalised weights of π_λ
    value = beta * float(np.mean(zmax[:, 0] + np.log(tot[:, 0]) - math.log(r.shape[1])))
    d = s - b  # [N, K, m]
    mean_d = np.einsum("nk,nkm->nm", w, d)  # E_{π_λ}[g − b] per prompt
    grad = mean_d.mean(axis=0)
    centred = d - mean_d[:, None, :]
    hess = np.einsum("nk,nki,nkj->ij", w, centred, centred) / (beta * r.shape[0])
    return value, grad, hess


def dual_objective(rewards, safety, beta: float, threshold, lam) -> float:
    """D̂(λ) = β·mean_i log mean_k exp((r_ik + λ·(g_ik − b))/β) (CAN, arXiv 2405.19544)."""
    r, s, b, _ = _shape(rewards, safety, beta, threshold)
    return _pieces(r, s, b, beta, _lam(lam, s.shape[2]))[0]


def dual_gradient(rewards, safety, beta: float, threshold, lam):
    """∇D̂(λ) = E_{π_λ}[g] − b (self-normalised over each prompt's samples, mean over prompts)."""
    r, s, b, scalar = _shape(rewards, safety, beta, threshold)
    g = _pieces(r, s, b, beta, _lam(lam, s.shape[2]))[1]
    return float(g[0]) if scalar else g


def predicted_safety(rewards, safety, beta: float, lam):
    """E_{π_λ}[g] with π_λ ∝ p·exp((r + λ·g)/β): per prompt the samples weighted by
    softmax_k((r_ik + λ·g_ik)/β), then averaged over prompts. λ = 0 gives the safety of the
    unconstrained optimum π_0 ∝ p·exp(r/β); the reference's own is the plain mean of g."""
    m = np.shape(safety)[2] if np.ndim(safety) == 3 else 1
    r, s, _, scalar = _shape(rewards, safety, beta, np.zeros(m))
    g = _pieces(r, s, np.zeros(s.shape[2]), beta, _lam(lam, s.shape[2]))[1]
    return float(g[0]) if scalar else g


def achievable_safety(safety):
    """mean_i max_k g_ik: the limit of predicted safety as λ → ∞ (per constraint)."""
    s = np.asarray(safety, dtype=np.float64)
    out = s.max(axis=1).mean(axis=0)
    return float(out) if s.ndim == 2 else out


def solve_dual(rewards, safety, beta: float, threshold, *, tol: float = 1e-10,
               max_iter: int = 200):
    """λ* = argmin_{λ≥0} D̂(λ) (CAN, arXiv 2405.19544).

    One constraint: a bracket [lo, hi] with ∇D̂(lo) < 0 < ∇D̂(hi) (∇D̂ is increasing: D̂ is
    convex), then safeguarded Newton: the Newton step when it stays inside the bracket,
    bisection otherwise. Several constraints: projected Newton with Armijo backtracking on the
    box λ ≥ 0 (the Newton system restricted to the free coordinates). Returns 0 (or zeros)
    when the unconstrained optimum π_0 already meets the constraint (∇D̂(0) ≥ 0). Raises
    `InfeasibleConstraint` when no finite λ exists (see the module docstring).
    `tol` is relative to the spread of g − b: |∇D̂(λ*)| ≤ tol·max|g − b| at a return.
    """
    r, s, b, scalar = _shape(rewards, safety, beta, threshold)
    reach = s.max(axis=1).mean(axis=0)
    # Not strictly above b: the slack only approaches 0 from below as λ → ∞.
    if np.any(reach <= b):
        raise InfeasibleConstraint(float(reach[0]) if scalar else reach,
                                   float(b[0]) if scalar else b)
    scale = float(np.abs(s - b).max()) or 1.0
    if s.shape[2] == 1:
        lam = _solve_1d(r, s, b, beta, tol * scale, max_iter)
        return lam if scalar else np.array([lam])
    return _solve_projected_newton(r, s, b, beta, tol * scale, max_iter)


def _solve_1d(r, s, b, beta, gtol, max_iter) -> float:
    grad = lambda lam: _pieces(r, s, b, beta, np.array([lam]))[1][0]  # noqa: E731
    if grad(0.0) >= 0:
        return 0.0  # inactive: π_0 ∝ p·exp(r/β) already meets the constraint
    # Natural unit of λ: β over the spread of g (the exponent moves by O(1) per unit).
    unit = beta / max(float(np.ptp(s)), 1e-300)
    lo, hi = 0.0, unit
    for _ in range(200):  # doubling: feasibility guarantees ∇D̂ > 0 for large enough λ
        if grad(hi) > 0:
            break
        lo, hi = hi, hi * 2.0
    else:
        raise InfeasibleConstraint(achievable_safety(s[..., 0]), float(b[0]))
    lam = 0.5 * (lo + hi)
    for _ in range(max_iter):
        _, g, h = _pieces(r, s, b, beta, np.array([lam]))
        g, h = g[0], h[0, 0]
        if abs(g) <= gtol:
            return lam
        if g > 0:
            hi = lam
        else:
            lo = lam
        step = lam - g / h if h > 0 else math.nan
        lam = step if lo < step < hi else 0.5 * (lo + hi)
        if hi - lo <= 1e-15 * max(1.0, hi):
            break
    return lam


def _solve_projected_newton(r, s, b, beta, gtol, max_iter) -> np.ndarray:
    m = s.shape[2]
    lam = np.zeros(m)
    value, grad, hess = _pieces(r, s, b, beta, lam)
    for _ in range(max_iter):
        projected = lam - np.maximum(lam - grad, 0.0)  # 0 exactly at a KKT point of λ ≥ 0
        if np.abs(projected).max() <= gtol:
            return lam
        # Coordinates held at the bound: λ_j = 0 and the gradient pushes it further down.
        free = (lam > 0) | (grad < 0)
        d = np.zeros(m)
        hf = hess[np.ix_(free, free)]
        ridge = 1e-12 * (np.trace(hf) / max(free.sum(), 1) + 1e-300)
        try:
            d[free] = -np.linalg.solve(hf + ridge * np.eye(free.sum()), grad[free])
        except np.linalg.LinAlgError:
            d[free] = -grad[free]
        if grad @ d >= 0:  # not a descent direction (numerically singular): steepest descent
            d = -np.where(free, grad, 0.0)
        t = 1.0
        while True:
            trial = np.maximum(lam + t * d, 0.0)
            v, g, h = _pieces(r, s, b, beta, trial)
            if v <= value + 1e-4 * float(grad @ (trial - lam)) or t < 1e-20:
                break
            t *= 0.5
        if np.array_equal(trial, lam):
            return lam
        lam, value, grad, hess = trial, v, g, h
        if not np.isfinite(lam).all() or lam.max() > 1e12 * beta / max(float(np.ptp(s)), 1e-300):
            raise InfeasibleConstraint(achievable_safety(s), b)  # jointly infeasible: λ diverges
    return lam


# ------------------------------------------------------------------------------------------
# The solved dual as a file: written by `alignserve dual`, read by the server (cost_weight auto)
# ------------------------------------------------------------------------------------------


# What λ was solved on: the sampling of the reference samples (`alignserve dual` fills it from
# the rollouts' manifest; an omitted control had vLLM's neutral value there).
SAMPLING_KEYS = ("model", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "max_tokens")


@dataclass(frozen=True)
class DualSolution:
    """λ* for one reward, one cost (g = −cost) and one (β, b). `lam` is the weight of the cost
    in the selection score r − λ*·cost = r + λ*·g, solved for the tilted policy π_λ*.

    `best_of_n` holds the served rule's own λ per n (decoding/dual_rules.py `bon_table`; JSON
    keys are n as strings); `reference` the N×K reference scores {"rewards", "safety"} the
    server needs to solve any other n exactly (None: only the stored n are served);
    `sampling` what the reference samples were drawn with (SAMPLING_KEYS)."""

    lam: float
    beta: float
    threshold: float
    reward: str
    cost: str
    predicted_safety: float
    reference_safety: float
    prompts: int
    samples: int
    active: bool
    sampling: dict = field(default_factory=dict)
    best_of_n: dict = field(default_factory=dict)
    reference: dict | None = None
    # best-of-n's λ meets b with this one-sided bootstrap confidence (0: on the mean; the same
    # for the n the server solves from `reference`): decoding/dual_rules.py
    bon_confidence: float = 0.0
    # per-process results computed from `reference` (the server's λ per n); not in the file
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict:
        out = {"lambda": self.lam, "beta": self.beta, "threshold": self.threshold,
               "reward": self.reward, "cost": self.cost,
               "predicted_safety": self.predicted_safety,
               "reference_safety": self.reference_safety, "prompts": self.prompts,
               "samples": self.samples, "active": self.active}
        if self.sampling:
            out["sampling"] = dict(self.sampling)
        if self.best_of_n:
            out["best_of_n"] = {str(n): v for n, v in sorted(self.best_of_n.items())}
        if self.reference is not None:
            out["reference"] = self.reference
        if self.bon_confidence:
            out["bon_confidence"] = self.bon_confidence
        return out

    @classmethod
    def from_json(cls, d: dict) -> DualSolution:
        if not isinstance(d, dict):
            raise ValueError("expected a JSON object")
        missing = [k for k in ("lambda", "beta", "threshold", "reward", "cost") if k not in d]
        if missing:
            raise ValueError(f"missing keys: {', '.join(missing)}")
        lam, beta = d["lambda"], d["beta"]
        for key, v in (("lambda", lam), ("beta", beta), ("threshold", d["threshold"])):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{key} must be a finite number, got {v!r}")
        if lam < 0 or beta <= 0:
            raise ValueError(f"need lambda ≥ 0 and beta > 0, got lambda={lam}, beta={beta}")
        for key in ("reward", "cost"):
            if not isinstance(d[key], str) or not d[key]:
                raise ValueError(f"{key} must be a scorer name, got {d[key]!r}")
        return cls(lam=float(lam), beta=float(beta), threshold=float(d["threshold"]),
                   reward=d["reward"], cost=d["cost"],
                   predicted_safety=float(d.get("predicted_safety", math.nan)),
                   reference_safety=float(d.get("reference_safety", math.nan)),
                   prompts=int(d.get("prompts", 0)), samples=int(d.get("samples", 0)),
                   active=bool(d.get("active", lam > 0)),
                   sampling=_sampling(d.get("sampling", {})),
                   best_of_n=_bon_entries(d.get("best_of_n", {})),
                   reference=_reference(d.get("reference")),
                   bon_confidence=_confidence(d.get("bon_confidence", 0.0)))


def _confidence(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ValueError(f"bon_confidence must be a number in [0, 1), got {v!r}")
    return float(v)


def _sampling(v) -> dict:
    if not isinstance(v, dict) or set(v) - set(SAMPLING_KEYS):
        raise ValueError(f"sampling must be an object with keys among {SAMPLING_KEYS}")
    return dict(v)


def _bon_entries(v) -> dict:
    """best_of_n: {"n": {"lambda": finite ≥ 0 or null, ...}} → {int n: entry}."""
    if not isinstance(v, dict):
        raise ValueError("best_of_n must be an object keyed by n")
    out = {}
    for key, entry in v.items():
        if not str(key).isdigit() or int(key) < 1 or not isinstance(entry, dict):
            raise ValueError(f"best_of_n[{key!r}]: keys are n ≥ 1, values objects")
        lam = entry.get("lambda")
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))
                                or not math.isfinite(lam) or lam < 0):
            raise ValueError(f"best_of_n[{key!r}].lambda must be null or a finite λ ≥ 0")
        out[int(key)] = entry
    return out


def _reference(v) -> dict | None:
    """reference: {"rewards": [[...]], "safety": [[...]]}, both [N, K] and finite."""
    if v is None:
        return None
    try:
        r = np.asarray(v["rewards"], dtype=np.float64)
        g = np.asarray(v["safety"], dtype=np.float64)
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"reference must hold numeric rewards and safety: {exc}") from exc
    if r.ndim != 2 or r.shape != g.shape or r.size == 0 or not (
            np.isfinite(r).all() and np.isfinite(g).all()):
        raise ValueError("reference rewards and safety must be finite [prompts, samples] arrays")
    return {"rewards": r.tolist(), "safety": g.tolist()}


def save_solution(path: Path, sol: DualSolution, **extra) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**sol.to_json(), **extra}, indent=2) + "\n")


def load_solution(path: Path) -> DualSolution:
    """Read and validate a dual file; every problem is a ValueError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
        return DualSolution.from_json(data)
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as exc:
        raise ValueError(f"dual file {path}: {exc}") from exc
