"""`alignserve eval --panel A,B,C`: the distortion of every strategy over a panel of users.

Each panel member is one user, a scorer from the registry (a leading `-` makes a cost a user's
utility: `-profanity`); members are single scorer names (an `ensemble:` would be several users
in one). For each answer the eval needs the rule's candidates, which it gets for free: the
runner asks the strategy to return them (`return_candidates`, in process on the
`DecodeRequest`, over HTTP in `alignment`), so nothing more is generated; every member then
scores the candidates once (one scorer call per member and answer, in this process: the
runtime's registry in process, a local registry of the same scorers with `--server`).

Per answer (decoding/nash.py, "Distortion of AI Alignment", a reconstruction on a finite
candidate set): each user's utilities are min–max normalised over the candidates (`welfare`),
`best` = the highest average normalised utility among the candidates and `achieved` = the
average normalised utility of the answer returned (one-hot `distortion_terms`: what the rule
returned, not its expectation, so every strategy is measured the same way). Over prompts the
distortion is Σ best / Σ achieved (`distortion`, a ratio of means with a percentile bootstrap
interval over prompts; the K answers to one prompt are summed first, so the bootstrap resamples
prompts, the unit of replication as in decoding/intervals.py). 1 is the ideal; a rule whose
answer is the worst candidate for every user has achieved = 0 and distortion ∞.

What counts as the candidates: the finished candidates the strategy returns (speculative
rejection's candidates rejected mid-answer are prefixes, not answers it could return), plus the
answer when it is not among them. A strategy that draws one answer (`none`, tokenwise CD,
n = 1) has that answer alone as candidate: distortion 1 by definition. A strategy that keeps no
candidate answers at n > 1 (blockwise CD: its per-block candidates are prefixes) is not
measured (`distortion` null).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from decoding.nash import distortion_terms
from decoding.protocols import Scorer

T = TypeVar("T")


@dataclass(frozen=True)
class Member:
    label: str  # as given: "relevance", "-profanity"
    name: str  # the scorer's registry name
    sign: float


def parse_panel(text: str | None) -> list[Member]:
    """'A,-B' → members; refuses what the eval cannot score here (before anything slow)."""
    if not text:
        return []
    labels = [x.strip() for x in text.split(",") if x.strip()]
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError("--panel: at least two distinct scorer names (each one user)")
    members = []
    for label in labels:
        name = label[1:] if label.startswith("-") else label
        if not name or name.startswith(("ensemble", "calibrated:", "remote:")):
            raise ValueError(f"--panel member {label!r}: one scorer per user, scored in this "
                             "process (no ensemble:/calibrated:, no remote:)")
        members.append(Member(label, name, -1.0 if label.startswith("-") else 1.0))
    return members


def candidate_set(candidates: Sequence[T], answer: T, text: Callable[[T], str]
                  ) -> tuple[list[T], int]:
    """The candidates with the answer added when no candidate has its text, and the answer's
    index among them (equal texts have equal utilities: any copy will do)."""
    pool = list(candidates)
    texts = [text(c) for c in pool]
    if text(answer) not in texts:
        pool.append(answer)
        texts.append(text(answer))
    return pool, texts.index(text(answer))


async def answer_terms(members: Sequence[Member], scorers: Sequence[Scorer], chosen: int,
                       score: Callable[[Scorer], Awaitable[list[float]]]) -> tuple[float, float]:
    """(best, achieved) of one answer, the candidate at `chosen`: `score(scorer)` scores every
    candidate with one member, members concurrently; a failing member fails the answer (it is
    never dropped)."""
    rows = await asyncio.gather(*(score(s) for s in scorers))
    utilities = [[m.sign * v for v in row] for m, row in zip(members, rows)]
    lottery = [1.0 if i == chosen else 0.0 for i in range(len(rows[0]))]
    return distortion_terms(utilities, lottery)
