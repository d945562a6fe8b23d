"""The data a request turns into on its way through the serving objects (no behaviour here).

validated pydantic request → `ResolvedRequest` (prompts tokenised, sampling resolved, strategy,
objective and value looked up in the registries: every limit checked) → one `Answer` per
(prompt, choice), each holding its strategy's `DecodeResult`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

from decoding.protocols import Scorer
from decoding.request import DecodeResult, Objective
from decoding.strategies import Strategy
from decoding.types import Sampling

from ..protocol import AlignmentBase
from ..tools import ToolPlan

# The endpoint (/v1/chat/completions or /v1/completions), also its `endpoint` metrics label.
Kind = Literal["chat", "completions"]


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what scorers see
    echo: str = ""  # completions: the prompt as text (what `echo` prepends)


@dataclass
class ResolvedRequest:
    """A request checked at the edge and resolved against the registries: what the strategy
    runs and the renderer reports."""

    kind: Kind
    prompts: list[Prompt]
    sampling: Sampling
    choices: int
    strategy: Strategy
    alignment: AlignmentBase | None
    objective: Objective | None
    stream: bool
    include_usage: bool
    value: Scorer | None = None  # controlled decoding's value function (alignment.value)
    warnings: list[str] = field(default_factory=list)  # reported as alignment.warnings
    constraint: dict | None = None  # alignment.constraint (cost_weight auto: server/constraint.py)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    logprobs: bool = False  # report the answer's token log-probs (OpenAI `logprobs`)
    model: str = ""  # the model id answering: base, preset or LoRA adapter (a metrics label)
    policy: str = ""  # the policy that answers (set once its lease is held)
    echo: bool = False  # completions: the prompt text precedes the answer
    preset: str | None = None  # the preset whose alignment runs (server/presets.py)
    tools: ToolPlan | None = None  # chat with tools: the answer becomes tool calls
    continuous_usage: bool = False  # streams: usage so far in every chunk

    @property
    def strategy_name(self) -> str:
        return self.strategy.name

    @property
    def answers(self) -> int:
        """OpenAI choices in the response: every prompt × `n`."""
        return len(self.prompts) * self.choices


@dataclass
class Answer:
    index: int  # OpenAI choice index: prompt_index * choices + choice
    prompt: Prompt
    result: DecodeResult

    @property
    def finish_reason(self) -> str:
        return self.result.sample.finish_reason or "length"
