"""`alignment.cost_weight: "auto"`: the safety constraint E[g] ≥ b under the rule actually served.

The `dual` setting names a file written by `alignserve dual` (decoding.dual.DualSolution): for
one reward scorer, one cost scorer (g = −cost), β and threshold b, CAN's λ* (Huang et al., arXiv
2405.19544), which makes the *tilted* policy π_λ* ∝ p·exp((r + λ*·g)/β) meet the constraint, and
the λ of each rule the server serves (decoding/dual_rules.py):

- best_of_n: λ_BoN(n), the smallest λ whose best-of-n by r + λ·g meets b on the reference
  samples: from the file's table, or solved exactly from its stored reference scores for an n
  not in the table (no scores stored: a 400 naming alignment.n);
- soft_best_of_n: λ* with selection temperature β, π_λ*'s own rule (`with_rule_options` fills
  in the request's `selection_temperature`; another value is a 400);
- the other selection rules (speculative_rejection, blockwise_cd) are refused with a 400: their
  safety at a given λ is not computed, and λ* is not theirs;
- strategies that select nothing by the score (plain sampling, tokenwise CD, aligner) report
  the answer's reward and cost as before, with λ* as the nominal weight.

λ is only meaningful for the pair it was solved for (units of reward per unit of cost): "auto"
fills in the dual's cost (and reward) when the request names none and refuses another one. The
answer's `alignment.constraint` reports the rule, its λ and the predicted E[g] (a mean over
prompts, not a per-answer guarantee) with a bootstrap interval over the reference prompts;
`alignment.warnings` say when the request samples otherwise than the reference samples were
drawn, or another policy than the one they came from answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from decoding.dual import DualSolution, load_solution
from decoding.dual_rules import (
    bon_entry,
    bootstrap_interval,
    soft_bon_simulation,
    tilted_safety_per_prompt,
)
from decoding.strategies import STRATEGIES
from decoding.types import Sampling

from .errors import APIError
from .protocol import AlignmentBase

# Soft best-of-n's simulation: prompts × draws × n scores at most (a few tens of MB).
_SIMULATION_CELLS = 4_000_000
BASE_POLICY = "base"  # server/policy/manager.py: the checkpoint the engine started from


def load_dual(path: Path | None) -> DualSolution | None:
    """The server's dual, or None. A bad file raises ValueError (Settings validated it already;
    read again here so that the server holds exactly what it checked at start-up)."""
    return None if path is None else load_solution(path)


@dataclass(frozen=True)
class ObjectiveNames:
    reward: str | None
    cost: str | None
    cost_weight: float


@dataclass(frozen=True)
class Served:
    """A rule's λ under "auto" and what the answer reports about it."""

    lam: float
    report: dict | None = None  # alignment.constraint
    warnings: list[str] = field(default_factory=list)


def resolve(a: AlignmentBase, dual: DualSolution | None, default_reward: str | None) -> ObjectiveNames:
    """Scorer names and the numeric cost weight of a request's objective."""
    if a.cost_weight != "auto":
        return ObjectiveNames(a.reward or default_reward, a.cost, float(a.cost_weight))
    if dual is None:
        raise APIError(400, "alignment.cost_weight 'auto' needs the CAN dual λ*, and this server "
                       "has none (start it with --dual FILE from `alignserve dual`)",
                       param="alignment.cost_weight", code="no_dual")
    if a.cost is not None and a.cost != dual.cost:
        raise APIError(400, f"alignment.cost_weight 'auto' is λ* for cost {dual.cost!r}; this "
                       f"request names cost {a.cost!r} (omit it or give a number)",
                       param="alignment.cost", code="dual_mismatch")
    if a.reward is not None and a.reward != dual.reward:
        raise APIError(400, f"alignment.cost_weight 'auto' is λ* for reward {dual.reward!r}; "
                       f"this request names reward {a.reward!r} (omit it or give a number)",
                       param="alignment.reward", code="dual_mismatch")
    return ObjectiveNames(dual.reward, dual.cost, served(a, dual).lam)


def served(a: AlignmentBase, dual: DualSolution) -> Served:
    """The λ and report of the rule request `a` is served by (module docstring); 400s for a
    rule "auto" cannot serve. Results are memoised on the dual (one per rule and n)."""
    rule = RULES.get(a.strategy)
    if rule is not None:
        return rule(a, dual)
    if STRATEGIES[a.strategy].traits.needs_objective:
        raise APIError(400, f"alignment.cost_weight 'auto' is not available for {a.strategy}: "
                       f"it selects by r − λ·cost with its own rule, whose safety at a given λ "
                       f"is not computed (CAN's λ* is solved for the tilted policy, and the "
                       f"argmax of a rule can fall below the threshold at λ*). Use best_of_n or "
                       f"soft_best_of_n with 'auto', or give a number",
                       param="alignment.cost_weight", code="dual_unsupported_strategy")
    return Served(dual.lam)  # selects nothing by the score: λ* is only reported


def constraint_report(a: AlignmentBase | None, dual: DualSolution | None,
                      sampling: Sampling, model: str) -> tuple[dict | None, list[str]]:
    """(alignment.constraint, warnings) of a request; (None, []) unless it says "auto".
    Call after `resolve` (which has already refused what "auto" cannot serve)."""
    if a is None or a.cost_weight != "auto" or dual is None:
        return None, []
    s = served(a, dual)
    return s.report, [*s.warnings, *sampling_warnings(dual, sampling, model)]


def sampling_warnings(dual: DualSolution, sampling: Sampling, model: str) -> list[str]:
    """λ holds for the policy and sampling the reference samples were drawn with: name every
    control this request sets otherwise (dual files without a record: one warning)."""
    rec = dual.sampling
    if not rec:
        return ["the dual file does not record the sampling its λ was solved on; re-run "
                "`alignserve dual` to check this request against it"]
    now = {"model": sampling.adapter or model, "temperature": sampling.temperature,
           "top_p": sampling.top_p, "top_k": sampling.top_k, "min_p": sampling.min_p,
           "presence_penalty": sampling.presence_penalty,
           "frequency_penalty": sampling.frequency_penalty,
           "repetition_penalty": sampling.repetition_penalty, "max_tokens": sampling.max_tokens}
    diffs = [f"{k} {now[k]!r} (solved at {rec[k]!r})" for k in now
             if k in rec and not _same(now[k], rec[k])]
    if sampling.logit_bias:
        diffs.append("logit_bias (solved without)")
    if not diffs:
        return []
    return [f"the constraint's λ was solved on reference samples drawn otherwise: "
            f"{', '.join(diffs)}; its predicted safety does not hold for this sampling"]


def stale_policy_warnings(a: AlignmentBase | None, dual: DualSolution | None,
                          policy: str) -> list[str]:
    """After a policy swap the dual describes another checkpoint (server/policy/manager.py): its
    reference samples came from the engine's start-up model, policy "base"."""
    if a is None or a.cost_weight != "auto" or dual is None or policy == BASE_POLICY:
        return []
    return [f"policy {policy!r} answers, but the dual's λ was solved on samples of the base "
            f"checkpoint ({dual.sampling.get('model', 'unrecorded')}): the dual is stale; "
            f"re-run `alignserve rollouts` and `alignserve dual` on this policy"]


def _same(x, y) -> bool:
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12)
    return x == y


# ---------------------------------------------------------------------------- the rules


def _reference(dual: DualSolution) -> tuple[np.ndarray, np.ndarray] | None:
    if dual.reference is None:
        return None
    return (np.asarray(dual.reference["rewards"], dtype=np.float64),
            np.asarray(dual.reference["safety"], dtype=np.float64))


def _bon_entry(dual: DualSolution, n: int) -> dict:
    """The best-of-n table's entry for n: stored, or solved from the reference scores."""
    if n in dual.best_of_n:
        return dual.best_of_n[n]
    key = ("best_of_n", n)
    if key in dual.memo:
        return dual.memo[key]
    ref = _reference(dual)
    if ref is None:
        stored = ", ".join(str(k) for k in sorted(dual.best_of_n)) or "none"
        raise APIError(400, f"alignment.cost_weight 'auto' with best_of_n needs λ solved for "
                       f"n = {n} (best-of-n's safety depends on n, and a neighbour's λ is not "
                       f"safe in general); this dual file stores n = {stored} and no reference "
                       f"scores to solve others: use one of those, or re-run `alignserve dual`",
                       param="alignment.n", code="dual_n_unsolved")
    entry = bon_entry(*ref, n, dual.threshold, dual.bon_confidence)
    dual.memo[key] = entry
    return entry


def _best_of_n(a: AlignmentBase, dual: DualSolution) -> Served:
    entry = _bon_entry(dual, a.n)
    if entry.get("lambda") is None:
        raise APIError(400, f"best-of-{a.n} cannot meet the safety threshold {dual.threshold:g} "
                       f"on the dual's reference samples at any cost weight (ordering by safety "
                       f"alone reaches {entry.get('reachable', float('nan')):.4g}); use a larger "
                       "alignment.n or a lower threshold", param="alignment.n",
                       code="constraint_infeasible")
    interval = entry.get("interval")
    report = {"rule": "best_of_n", "n": a.n, "lambda": entry["lambda"],
              "threshold": dual.threshold, "predicted_safety": entry.get("predicted_safety"),
              "predicted_safety_interval": interval, "scope": _SCOPE,
              "reference": {"prompts": dual.prompts, "samples": dual.samples}}
    if entry.get("lower_bound") is not None:  # λ solved on a one-sided bootstrap bound
        report.update(confidence=entry["confidence"], predicted_safety_lower=entry["lower_bound"])
    return Served(float(entry["lambda"]), report, _below(report))


def with_rule_options(a: AlignmentBase | None, dual: DualSolution | None) -> AlignmentBase | None:
    """The request's alignment with the options "auto" fills in: soft best-of-n's
    `selection_temperature` = β when the request gives none (π_λ*'s own rule). Requests are
    immutable, so this is a copy; the resolver serves the copy."""
    if (a is None or dual is None or a.cost_weight != "auto" or a.strategy != "soft_best_of_n"
            or "selection_temperature" in a.model_fields_set):
        return a
    return a.model_copy(update={"selection_temperature": dual.beta})


def _soft_best_of_n(a: AlignmentBase, dual: DualSolution) -> Served:
    given = getattr(a, "selection_temperature", None)
    if "selection_temperature" not in a.model_fields_set or not _same(given, dual.beta):
        raise APIError(400, f"alignment.cost_weight 'auto' serves π_λ* ∝ p·exp((r + λ*·g)/β), "
                       f"whose soft best-of-n selects at temperature β = {dual.beta:g}; this "
                       f"request has selection_temperature {given!r} (omit it or set it to "
                       f"{dual.beta:g})", param="alignment.selection_temperature",
                       code="dual_mismatch")
    report = {"rule": "soft_best_of_n", "n": a.n, "lambda": dual.lam,
              "selection_temperature": dual.beta, "threshold": dual.threshold,
              "tilted_safety": dual.predicted_safety, "scope": _SCOPE,
              "reference": {"prompts": dual.prompts, "samples": dual.samples}}
    ref = _reference(dual)
    if ref is None:
        return Served(dual.lam, report, ["the dual file stores no reference scores: the "
                                         "safety of soft best-of-n at this n is not predicted "
                                         "(only π_λ*'s, its n → ∞ limit)"])
    key = ("soft_best_of_n", a.n)
    if key not in dual.memo:
        draws = max(64, min(512, _SIMULATION_CELLS // (ref[0].shape[0] * a.n)))
        per_prompt, ess = soft_bon_simulation(*ref, a.n, dual.beta, dual.lam, draws=draws)
        tilted = tilted_safety_per_prompt(*ref, dual.beta, dual.lam)
        dual.memo[key] = {"predicted_safety": float(per_prompt.mean()),
                          "predicted_safety_interval": list(bootstrap_interval(per_prompt)),
                          "tilted_safety_interval": list(bootstrap_interval(tilted)),
                          "selection_ess": ess}
    report.update(dual.memo[key])
    return Served(dual.lam, report, _below(report))


# Strategies whose rule "auto" solves (or, for soft best-of-n, whose λ* is its own).
RULES: dict[str, Callable[[AlignmentBase, DualSolution], Served]] = {
    "best_of_n": _best_of_n, "soft_best_of_n": _soft_best_of_n}

_SCOPE = ("mean over prompts like the dual's reference prompts, not a per-answer guarantee")


def _below(report: dict) -> list[str]:
    interval = report.get("predicted_safety_interval")
    if not interval or interval[1] >= report["threshold"]:
        return []
    return [f"{report['rule']} with n = {report['n']} is predicted below the safety threshold "
            f"{report['threshold']:g} (E[g] {report['predicted_safety']:.4g}, interval "
            f"[{interval[0]:.4g}, {interval[1]:.4g}]) on the dual's reference samples"]
