"""`alignment.cost_weight: "auto"`: the cost weight from CAN's dual (Huang et al., arXiv 2405.19544).

The `dual` setting names a file written by `alignserve dual` (decoding.dual.DualSolution): λ*
solved for one reward scorer, one cost scorer (g = −cost), β and threshold b. "auto" selects by
r − λ*·cost = r + λ*·g, the exponent of CAN's optimal policy π_λ* ∝ p·exp((r + λ*·g)/β).

λ* only means something for the pair it was solved for: its size is in units of reward per
unit of cost. So "auto" fills in the dual's cost (and reward) when the request names none, and
refuses a request that names a different one instead of applying a meaningless weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from decoding.dual import DualSolution, load_solution

from .errors import APIError
from .protocol import AlignmentBase


def load_dual(path: Path | None) -> DualSolution | None:
    """The server's dual, or None. A bad file raises ValueError (Settings validated it already;
    read again here so that the server holds exactly what it checked at start-up)."""
    return None if path is None else load_solution(path)


@dataclass(frozen=True)
class ObjectiveNames:
    reward: str | None
    cost: str | None
    cost_weight: float


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
    return ObjectiveNames(dual.reward, dual.cost, dual.lam)
