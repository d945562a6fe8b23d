"""One decoding job and its answer: what the server hands a strategy (`DecodeRequest`, with
its `Objective` and the strategy's `StrategyOptions`) and what the strategy hands back
(`DecodeResult`, its `Scored` candidates and `Timer`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

from pydantic import BaseModel, ConfigDict

from .protocols import Scorer
from .types import Sample, SampleDelta, Sampling


@dataclass(frozen=True)
class Objective:
    """Selection score = reward − cost_weight · cost."""

    reward: Scorer
    cost: Scorer | None = None
    cost_weight: float = 1.0


@dataclass
class Scored:
    """A sample with its scores; `score` is the selection objective."""

    sample: Sample
    reward: float | None  # None: a candidate rejected on a value score, never rewarded
    cost: float | None
    score: float


@dataclass
class Timer:
    """Accumulates wall time spent generating and scoring (the `latency` breakdown)."""

    generate_s: float = 0.0
    score_s: float = 0.0


class StrategyOptions(BaseModel):
    """Base of every strategy's `Options`: the strategy-specific fields of a request's
    `alignment` block (decoding/strategies.py). Frozen, and an unknown key is refused, so a
    field of another strategy never passes silently; JSON names may differ from the Python
    names through aliases (tokenwise_cd's "lambda")."""

    # allow_inf_nan=False: `1e999` parses to inf in JSON; no option means anything there
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              allow_inf_nan=False)

    @classmethod
    def of(cls, req: DecodeRequest) -> Self:
        """`req.options` as this strategy's options (its defaults when the request has none)."""
        if req.options is None:
            return cls()
        if not isinstance(req.options, cls):
            raise TypeError(f"expected {cls.__qualname__}, got {type(req.options).__qualname__}")
        return req.options


@dataclass
class DecodeRequest:
    """One aligned answer to produce (one OpenAI choice)."""

    prompt_ids: list[int]
    prompt_text: str  # what scorers see as the prompt (the last user message, or the raw prompt)
    sampling: Sampling
    n: int = 1
    objective: Objective | None = None
    return_candidates: bool = False
    seed: int | None = None  # for the strategy's own randomness (soft best-of-n's draw)
    # The strategy's own `Options` (validated upstream); None: its defaults.
    options: StrategyOptions | None = None
    value: Scorer | None = None  # controlled decoding's value function (checked upstream)
    # Called with each committed piece of the answer's text, in order, by strategies that
    # commit text before they finish (`Traits.streams == "text"`); the server streams the pieces.
    emit: Callable[[str], None] | None = None
    # Called with each engine delta of the answer's one sample, by strategies whose answer is
    # one plain engine sample (`Traits.streams == "tokens"`); the server streams tokens and
    # log-probs.
    on_delta: Callable[[SampleDelta], None] | None = None


@dataclass
class DecodeResult:
    """The chosen sample and the accounting the API reports under `alignment`."""

    strategy: str
    n: int
    sample: Sample
    reward: float | None = None
    cost: float | None = None
    kl_bound: float | None = 0.0  # None: no bound holds (aligner: the corrector writes new text)
    kl_estimate: float | None = 0.0
    win_rate_bound: float | None = None
    generated_tokens: int = 0
    scored_candidates: int = 0
    timer: Timer = field(default_factory=Timer)
    candidates: list[Scored] | None = None
    extra: dict = field(default_factory=dict)  # strategy-specific fields (rounds, blocks, ...)
    warnings: list[str] = field(default_factory=list)  # added to the answer's alignment.warnings
