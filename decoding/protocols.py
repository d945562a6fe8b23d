"""The two narrow interfaces every strategy talks to, and the data that crosses them.

Engine: samples continuations of a token prompt (with the per-token log-probabilities of the
sampled tokens under the distribution actually sampled from) and aborts on cancellation.
Scorer: scores a batch of responses to one prompt; synchronous (CPU/GPU bound), so strategies
run it in a worker thread through `DecodeContext.score`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, Self, runtime_checkable

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class Tilt:
    """Tokenwise CD-Q inside the engine (Mudgal et al. 2024, arXiv 2310.17022): sample from
    p_T(z)·exp(λ·Q(x, yᵗ, z)) over the whole vocabulary, Q from the CD-Q value head named
    `head` (a scorer name, `value:NAME`). An optional engine capability (see `TiltingEngine`):
    the vLLM engine has it for the heads it loaded into its CD-Q logits processor."""

    head: str
    lam: float


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling settings (OpenAI semantics)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int = 0  # also return the top-k next-token log-probs at each position
    adapter: str | None = None  # a registered LoRA adapter (server/policies.py); None: the policy
    # vLLM's extra sampling controls (neutral defaults = off). Every engine call of every
    # strategy carries them, so selection happens among candidates that obey them.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    # Structured output: ("json_object", "") or ("json_schema", "<the schema as JSON>").
    structured: tuple[str, str] | None = None


@dataclass
class Sample:
    """One sampled continuation.

    `logprobs[i]` is log p(token_ids[i] | prefix) under the processed distribution (after
    temperature and top-p), which is what the best-of-n KL estimator needs.
    `finish_reason` is "stop" (EOS or stop string), "length", or None while unfinished.
    `top_logprobs[i]` (only when `Sampling.top_logprobs` = k > 0) maps the k most likely tokens
    at position i to their log-probabilities under the same processed distribution.
    """

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None
    top_logprobs: list[dict[int, float]] | None = None
    @property
    def logprob(self) -> float:
        return math.fsum(self.logprobs)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class SampleDelta:
    """An increment of sample `index` while streaming (new tokens and text since the last delta)."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None
    top_logprobs: list[dict[int, float]] | None = None  # as Sample.top_logprobs, per new token
    # Tilted samples (TiltingEngine) only, on the delta that finishes the sample: KL(πₜ ‖ p_T,ₜ)
    # of every step's tilted distribution and each step's bound λ·(max Q − min Q). Their
    # `logprobs` are log πₜ of the tokens (the distribution actually sampled from).
    step_kl: list[float] | None = None
    step_kl_bound: list[float] | None = None


class EngineRejected(ValueError):
    """The engine refused a request's parameters (a client error: the server answers 400).
    `param` names the request field when the engine said which."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineUnavailable(RuntimeError):
    """The engine cannot serve now (its worker died, or it is restarting): the server answers
    503 with Retry-After, so clients and load balancers go elsewhere."""


@runtime_checkable
class Engine(Protocol):
    """Samples from the policy. Cancelling a call aborts its engine requests (no leaks).
    Raises `EngineRejected` for parameters it cannot honour, `EngineUnavailable` when dead.
    Also detokenises: strategies that assemble an answer from several calls (controlled
    decoding) decode the whole id list once, since per-piece text splits multi-byte characters."""

    eos_token_ids: frozenset[int]  # any of them ends an answer ("stop")
    # Optional (read with getattr): the KV block size, in tokens, that the engine's prefix cache
    # works in. Strategies that resubmit prefixes (blockwise CD) align their cuts to it.
    # block_size: int

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` as the engine reports a sample's text (special tokens skipped)."""
        ...

    async def generate(self, prompt_ids: Sequence[int], n: int, sampling: Sampling) -> list[Sample]:
        """n i.i.d. continuations of `prompt_ids` (a prefix of already accepted ids may be
        appended by the caller: the engine's prefix cache reuses their KV blocks)."""
        ...

    def stream(
        self, prompt_ids: Sequence[int], sampling: Sampling
    ) -> AsyncGenerator[SampleDelta, None]:
        """One continuation (n = 1) like `generate`'s, as deltas (index 0) while it is
        produced; closing it early aborts."""
        ...

    def stream_sequence(
        self, prompt_ids: Sequence[int], sampling: Sampling
    ) -> AsyncGenerator[SampleDelta, None]:
        """ONE sequence (n = 1, one engine request), as deltas (index 0) while it decodes;
        the last delta carries the finish reason. Closing the iterator or cancelling the task
        that consumes it before the end aborts the request at once (its KV blocks are freed),
        so a strategy can stop one sequence while its siblings keep decoding."""
        ...


@runtime_checkable
class TiltingEngine(Engine, Protocol):
    """An engine that can also sample tokenwise CD-Q inside its sampler (`Tilt`): one engine
    request per answer, streamed, aborted on cancellation like `stream`."""

    tilt_heads: frozenset[str]  # the value heads (scorer names) it can tilt with

    def tilted(
        self, prompt_ids: Sequence[int], sampling: Sampling, tilt: Tilt
    ) -> AsyncGenerator[SampleDelta, None]: ...


@runtime_checkable
class Scorer(Protocol):
    """Batched scorer: one float per response (rewards: higher is better; costs: higher is worse)."""

    name: str

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]: ...


@runtime_checkable
class TokenScorer(Scorer, Protocol):
    """A scorer that reads token ids (a value head): it scores `prompt_ids + response_ids`
    exactly as the policy produced them, since re-tokenising text does not always give the
    sampled ids back. `DecodeContext.score` prefers this over `score` when a scorer has it."""

    def score_ids(
        self, prompt_ids: Sequence[int], responses: Sequence[Sequence[int]]
    ) -> list[float]: ...


@runtime_checkable
class PairScorer(Protocol):
    """Optional for a text scorer: scores (prompt, response) pairs of *different* prompts in one
    call, so the server can batch score calls across requests (runtime/batching.py). A scorer
    without it is called once per prompt."""

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]: ...


@runtime_checkable
class TokenPairScorer(Protocol):
    """`PairScorer` for a TokenScorer: (prompt_ids, response_ids) pairs in one call."""

    def score_ids_pairs(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[float]: ...


@runtime_checkable
class QScorer(TokenScorer, Protocol):
    """A CD-Q head (Mudgal et al. 2024): V(x, yᵗ, z) for candidate next tokens z, all from one
    forward pass over x + yᵗ."""

    def q_values(
        self, prompt_ids: Sequence[int], response_ids: Sequence[int], candidates: Sequence[int]
    ) -> list[float]: ...


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


@dataclass
class DecodeContext:
    """What a strategy may use: the engine, and an executor that keeps scorers off the event loop."""

    engine: Engine
    executor: Executor | None = None
    # Tracing hook (server/otel.py): a context manager around each score call, given a span
    # name and attributes; None: off.
    span: Callable[[str, dict[str, Any]], AbstractContextManager[Any]] | None = None

    def _span(self, name: str, attrs: dict[str, Any]) -> AbstractContextManager[Any]:
        return self.span(name, attrs) if self.span is not None else contextlib.nullcontext()

    async def generate(
        self, prompt_ids: Sequence[int], n: int, sampling: Sampling, timer: Timer
    ) -> list[Sample]:
        """An engine call whose wall time is added to `timer.generate_s`."""
        t0 = time.perf_counter()
        try:
            return await self.engine.generate(prompt_ids, n, sampling)
        finally:
            timer.generate_s += time.perf_counter() - t0

    async def stream(
        self, prompt_ids: Sequence[int], sampling: Sampling, timer: Timer,
        on_delta: Callable[[SampleDelta], None],
    ) -> Sample:
        """One sample, streamed: each engine delta goes to `on_delta` as it arrives, and the
        assembled sample is returned; wall time is added to `timer.generate_s`. Cancelling
        the call closes the engine stream, which aborts the request."""
        t0 = time.perf_counter()
        s = Sample([], "", [], None)
        deltas = self.engine.stream(prompt_ids, sampling)
        try:
            async for d in deltas:
                s.token_ids += d.token_ids
                s.text += d.text
                s.logprobs += d.logprobs
                if d.top_logprobs is not None:
                    s.top_logprobs = (s.top_logprobs or []) + d.top_logprobs
                s.finish_reason = d.finish_reason
                on_delta(d)
        finally:
            await deltas.aclose()
            timer.generate_s += time.perf_counter() - t0
        return s

    async def score(
        self, scorer: Scorer, req: DecodeRequest, samples: Sequence[Sample]
    ) -> list[float]:
        """One score per sample, in a worker thread: token ids for a TokenScorer, text otherwise."""
        with self._span("score", {"alignserve.scorer": scorer.name,
                                  "alignserve.candidates": len(samples)}):
            values = await self._score(scorer, req, samples)
        if len(values) != len(samples):
            raise RuntimeError(f"scorer {scorer.name} returned {len(values)} scores for {len(samples)}")
        return [float(v) for v in values]

    async def _score(
        self, scorer: Scorer, req: DecodeRequest, samples: Sequence[Sample]
    ) -> Sequence[float]:
        """The score call itself (`BatchingContext` batches it across requests)."""
        call: Callable[..., Sequence[float]]
        args: tuple[Any, ...]
        if hasattr(scorer, "score_ids"):
            call, args = scorer.score_ids, (req.prompt_ids, [list(s.token_ids) for s in samples])
        else:
            call, args = scorer.score, (req.prompt_text, [s.text for s in samples])
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, call, *args)

    async def q_values(
        self, scorer: QScorer, req: DecodeRequest, response_ids: Sequence[int],
        candidates: Sequence[int], timer: Timer,
    ) -> list[float]:
        """V(x, yᵗ, z) for each candidate z (one forward pass), in a worker thread."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            with self._span("score.q_values", {"alignserve.scorer": scorer.name,
                                               "alignserve.candidates": len(candidates)}):
                values = await loop.run_in_executor(self.executor, scorer.q_values,
                                                    req.prompt_ids, list(response_ids),
                                                    list(candidates))
        finally:
            timer.score_s += time.perf_counter() - t0
        if len(values) != len(candidates):
            raise RuntimeError(f"value head {scorer.name} returned {len(values)} values for "
                               f"{len(candidates)} candidates")
        return [float(v) for v in values]

    async def score_samples(
        self, objective: Objective, req: DecodeRequest, samples: Sequence[Sample], timer: Timer
    ) -> list[Scored]:
        """Reward and cost of every sample (both scorers run concurrently)."""
        t0 = time.perf_counter()
        jobs = [self.score(objective.reward, req, samples)]
        if objective.cost is not None:
            jobs.append(self.score(objective.cost, req, samples))
        results = await asyncio.gather(*jobs)
        timer.score_s += time.perf_counter() - t0
        rewards = results[0]
        costs = results[1] if objective.cost is not None else [None] * len(samples)
        return [
            Scored(s, r, c, r - objective.cost_weight * c if c is not None else r)
            for s, r, c in zip(samples, rewards, costs)
        ]


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
