"""MoCAN relabelling (Huang et al., "One-Shot Safety Alignment for Large Language Models via
Optimal Dualization", arXiv 2405.19544, model-based CAN).

With the optimal dual weight λ* (decoding/dual.py), the safety-constrained optimum is the
unconstrained optimum for the combined reward w = r + λ*·g (g = −cost). MoCAN scores both
responses of each pair with w and draws a new preference from Bradley–Terry:

    P(y₁ ≻ y₀ | x) = σ((w₁ − w₀)/τ)          (τ = 1 in the paper; `temperature` rescales
                                              scorers that are not on a logit scale)

then runs plain DPO on the relabelled pairs (finetune/losses.py with Δ = 0). Labels are sampled
with a seeded generator, so a run is reproducible; over many copies of a pair the share labelled
y₁ tends to σ((w₁ − w₀)/τ).

λ* comes from `--lambda`, from a file written by `alignserve dual` (key "lambda"), or is solved
here from a rollout folder with `decoding.dual.solve_dual` (as `alignserve dual` does).

DPO's β is tied to the dual's (`tied_beta`). λ* is optimal for the tilted policy
π_λ* ∝ p·exp((r + λ*·g)/β_dual), at the β_dual it was solved for. DPO with weight β_DPO on labels
drawn from σ((w₁ − w₀)/τ) converges to π ∝ p·exp(w/(τ·β_DPO)) (its implicit reward
β_DPO·log π/p fits the Bradley–Terry logit w/τ; Rafailov et al. 2023, arXiv 2305.18290), which
is π_λ* only when τ·β_DPO = β_dual. Otherwise the trained policy sits at another KL and λ*
no longer meets the constraint with the least reward loss: its safety is neither predicted nor
guaranteed. So β_DPO defaults to β_dual/τ, and any other value is refused unless explicitly
allowed (then the report carries the warning): a silent mismatch would be indistinguishable
from a working run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .pairs import PreferencePair
from .safedpo import DPOExample

DEFAULT_BETA = 0.1  # DPO's β when nothing ties it (SafeDPO's default, --lambda given directly)
BETA_REL_TOL = 1e-9


def tied_beta(beta_dual: float | None, temperature: float, beta: float | None,
              allow_mismatch: bool = False) -> tuple[float, str, str | None]:
    """(β_DPO, where it came from, warning or None) for MoCAN (see the module docstring).
    `beta_dual` None (λ* given by --lambda): nothing to tie, `beta` or DEFAULT_BETA.
    A `beta` with τ·β ≠ β_dual raises ValueError unless `allow_mismatch`."""
    if beta_dual is None:
        return (beta, "--beta", None) if beta is not None else (DEFAULT_BETA, "default", None)
    tied = beta_dual / temperature
    if beta is None:
        return tied, "β_dual/τ", None
    if math.isclose(temperature * beta, beta_dual, rel_tol=BETA_REL_TOL):
        return beta, "--beta", None
    message = (f"--beta {beta:g} with --temperature {temperature:g} gives τ·β = "
               f"{temperature * beta:g} ≠ the dual's β {beta_dual:g}: DPO would converge to "
               f"p·exp(w/{temperature * beta:g}), not the π_λ* that λ* was solved for; drop "
               f"--beta (default β_dual/τ = {tied:g}) or pass --allow-beta-mismatch")
    if not allow_mismatch:
        raise ValueError(message)
    return beta, "--beta (mismatch allowed)", message


@dataclass(frozen=True)
class LambdaSource:
    value: float
    source: str  # "flag", "dual file PATH" or "rollouts DIR"
    detail: dict


def score_pairs(pairs: Sequence[PreferencePair], reward, cost, progress: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
    """Reward r [n, 2] and cost [n, 2] of both responses, from `Scorer`s (runtime/scorers.py)."""
    from tqdm import tqdm

    r = np.zeros((len(pairs), 2))
    c = np.zeros((len(pairs), 2))
    for i, pair in enumerate(tqdm(pairs, desc="scoring pairs", unit="pair", disable=not progress)):
        r[i] = reward.score(pair.prompt, list(pair.responses))
        c[i] = cost.score(pair.prompt, list(pair.responses))
    return r, c


def preference_probs(rewards: np.ndarray, costs: np.ndarray, lam: float,
                     temperature: float = 1.0) -> np.ndarray:
    """P(y₁ ≻ y₀) = σ((w₁ − w₀)/τ), w = r + λ·g = r − λ·cost. Inputs [n, 2] → [n]."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    w = np.asarray(rewards, dtype=np.float64) - lam * np.asarray(costs, dtype=np.float64)
    z = (w[:, 1] - w[:, 0]) / temperature
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z) without overflow warnings


def mocan_relabel(pairs: Sequence[PreferencePair], rewards: np.ndarray, costs: np.ndarray,
                  lam: float, seed: int, temperature: float = 1.0
                  ) -> tuple[list[DPOExample], dict]:
    """Sample one label per pair from P(y₁ ≻ y₀); returns DPO examples and statistics
    (mean P, share labelled y₁, agreement with the data's better/safer ids)."""
    p1 = preference_probs(rewards, costs, lam, temperature)
    ones = np.random.default_rng(seed).random(len(pairs)) < p1
    examples = []
    for pair, one in zip(pairs, ones):
        w = int(one)
        examples.append(DPOExample(pair.prompt, pair.responses[w], pair.responses[1 - w],
                                   int(not pair.safe[w]), int(not pair.safe[1 - w]), "relabel"))
    better = np.array([p.better for p in pairs])
    safer = np.array([p.safer for p in pairs])
    stats = {"pairs": len(pairs), "lambda": lam, "temperature": temperature,
             "mean_p1": float(p1.mean()), "labelled_1": float(ones.mean()),
             "agree_better": float((ones == better).mean()),
             "agree_safer": float((ones == safer).mean()),
             "unsafe_chosen": int(sum(ex.h_chosen for ex in examples))}
    return examples, stats


def lambda_from_rollouts(folder: Path, reward: str, cost: str, beta: float, threshold: float,
                         length_target: int = 64) -> LambdaSource:
    """λ* = decoding.dual.solve_dual(r, g, β, b) on a rollout folder's [prompts, samples]
    scores (stored ones when the scorer names match, rescored otherwise: dual_cli.load_scores)."""
    from decoding.dual import solve_dual
    from dual.cli import load_scores

    if not beta > 0:
        raise ValueError("--dual-beta must be > 0")
    _, reward, cost, r, c = load_scores(Path(folder), reward, cost, length_target)
    lam = float(solve_dual(r, -c, beta, threshold))
    return LambdaSource(lam, f"rollouts {folder}",
                        {"beta": beta, "threshold": threshold, "prompts": int(r.shape[0]),
                         "samples": int(r.shape[1]), "reward": reward, "cost": cost})


def lambda_from_dual_file(path: Path) -> LambdaSource:
    """λ* from `alignserve dual`'s JSON (validated by decoding.dual.load_solution)."""
    from decoding.dual import load_solution

    sol = load_solution(Path(path))
    return LambdaSource(sol.lam, f"dual file {path}",
                        {"beta": sol.beta, "threshold": sol.threshold, "reward": sol.reward,
                         "cost": sol.cost})
