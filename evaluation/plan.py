"""What to evaluate: the prompts, and one `Setting` per (strategy, n) to run on all of them.

Strategy names are checked against `decoding.strategies.STRATEGIES` (importing `decoding` fills
it, speculative rejection included), so a new registered strategy is evaluated without changes
here. A strategy that needs no objective selects nothing among candidates, so n means nothing to
it: it runs once (n = 1) however many n the sweep lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import decoding  # noqa: F401  (registers every strategy, speculative_rejection included)
from decoding.strategies import STRATEGIES

BASE = "none"  # the base policy p that win rates are judged against

# Cost thresholds under which an answer counts as harmless. profanity is a probability from
# alt-profanity-check's classifier, so 0.5 is its decision boundary. Other costs need a flag.
DEFAULT_HARMLESS_THRESHOLDS = {"profanity": 0.5}


@dataclass(frozen=True)
class Setting:
    """One point of the evaluation: a strategy at one n, with strategy-specific options."""

    strategy: str
    n: int
    options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def label(self) -> str:
        return f"{self.strategy} n={self.n}" if uses_n(self.strategy) else self.strategy


def uses_n(strategy: str) -> bool:
    return STRATEGIES[strategy].traits.needs_objective


def build_plan(strategies: list[str], ns: list[int], options: dict) -> list[Setting]:
    """Settings in run order: the base policy first (added if missing: every win rate needs it),
    then each strategy at every n of the sweep (once, at n = 1, if it does not use n)."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {', '.join(unknown)}; available: "
                         f"{', '.join(sorted(STRATEGIES))}")
    if not ns or any(n < 1 for n in ns):
        raise ValueError("every n must be ≥ 1")
    names = list(dict.fromkeys([BASE, *strategies]))
    plan = []
    for name in names:
        for n in (sorted(set(ns)) if uses_n(name) else [1]):
            plan.append(Setting(name, n, dict(options)))
    return plan


def parse_list(text: str, kind: type = str) -> list:
    """'a,b, c' → ['a', 'b', 'c'] (converted by `kind`)."""
    return [kind(x.strip()) for x in text.split(",") if x.strip()]
