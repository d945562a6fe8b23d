"""The two narrow interfaces every strategy talks to.

Engine: samples continuations of a token prompt (with the per-token log-probabilities of the
sampled tokens under the distribution actually sampled from) and aborts on cancellation.
Scorer: scores a batch of responses to one prompt; synchronous (CPU/GPU bound), so strategies
run it in a worker thread through `DecodeContext.score` (decoding/context.py).
The data crossing them is in decoding/types.py, what an engine raises in decoding/errors.py.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol, runtime_checkable

from .types import Sample, SampleDelta, Sampling, Tilt


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
