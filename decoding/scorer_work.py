"""Scorer work of one aligned answer: how many answers (partial or whole) scorers read, and
how many response tokens those answers held.

Reported as `scorer_calls` / `scored_tokens` in the answer's alignment info by the selection
strategies (best-of-n, soft best-of-n, speculative rejection, blockwise CD), so benchmarks can
count the scorer's share of the compute next to `generated_tokens`: speculative rejection
scores every partial answer at every decision point, which `scored_candidates` (N) hides.
One answer read by a reward and a cost scorer counts twice (both run over its tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .request import Objective
from .types import Sample


@dataclass
class ScorerWork:
    """Running totals; `add` one batch of answers handed to `scorers` scorers."""

    calls: int = 0
    tokens: int = 0

    def add(self, samples: Sequence[Sample], scorers: int = 1) -> None:
        self.calls += scorers * len(samples)
        self.tokens += scorers * sum(len(s.token_ids) for s in samples)

    def fields(self) -> dict[str, int]:
        """The alignment-info fields."""
        return {"scorer_calls": self.calls, "scored_tokens": self.tokens}


def objective_scorers(objective: Objective | None) -> int:
    """How many scorers `DecodeContext.score_samples` runs for this objective."""
    if objective is None:
        return 0
    # an ensemble (runtime/ensemble.py) runs each of its members over the answers
    reward = len(getattr(objective.reward, "members", None) or [0])
    cost = 0 if objective.cost is None else len(getattr(objective.cost, "members", None) or [0])
    return reward + cost


def scorer_work(objective: Objective | None, samples: Sequence[Sample]) -> dict[str, int]:
    """The fields for answers each scored once by `objective` (best-of-n's pool)."""
    work = ScorerWork()
    work.add(samples, objective_scorers(objective))
    return work.fields()
