"""The data that crosses the engine seam: sampling settings (`Sampling`, `Tilt`) in, samples
(`Sample`, `SampleDelta`) out. Plain dataclasses, no behaviour beyond derived fields."""

from __future__ import annotations

import math
from dataclasses import dataclass


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
    # a registered LoRA adapter (server/policy/manager.py); None: the policy
    adapter: str | None = None
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
