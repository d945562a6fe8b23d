"""What a `Runtime` is: the engine the server and the tools drive, its scorers and the
strategies' context. `ServingEngine` is the small interface the server needs from an engine on
top of `decoding.Engine` (the model: TGI's Backend trait); `VllmEngine` implements it, and so
does the unit tests' FakeEngine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from decoding.context import DecodeContext
from decoding.protocols import Engine

if TYPE_CHECKING:  # scorers load torch (value heads); this module stays light for the CLIs
    from .scorers import ScorerRegistry


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the server and the tools use."""

    def __len__(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = ...,
                            add_generation_prompt: bool = ..., continue_final_message: bool = ...,
                            **variables: Any) -> Any: ...


class ServingEngine(Engine, Protocol):
    """`decoding.Engine` plus what serving needs: tokenizer and context length (prompt
    rendering, limits, /v1/models), health and load (probes, metrics, admin status), weight and
    adapter swaps (server/policy/manager.py) and shutdown (`open_runtime`)."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The generation_config's sampling defaults that requests omitting a field get."""
        ...

    @property
    def model_path(self) -> str | None:
        """The base policy's folder or id: swapping back to the base reloads from here."""
        ...

    @property
    def lora_enabled(self) -> bool: ...

    @property
    def aborted(self) -> int:
        """Engine requests aborted before they finished (a metric)."""
        ...

    def num_unfinished_requests(self) -> int: ...

    async def check_health(self) -> None:
        """Raises when the engine cannot serve (its worker died)."""
        ...

    async def reload_weights(self, path: str) -> None: ...

    async def reset_prefix_cache(self) -> None: ...

    async def add_adapter(self, name: str, path: str) -> None: ...

    async def remove_adapter(self, name: str) -> None: ...

    def shutdown(self) -> None: ...


@dataclass
class Runtime:
    """Everything a serving object or an offline tool needs; built once per process by
    `runtime.startup.build_runtime` (tests build it around fakes)."""

    engine: ServingEngine
    scorers: ScorerRegistry
    ctx: DecodeContext
    model_name: str
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA name -> folder (server/policy/)

    def close(self) -> None:
        """Stop the engine (its worker processes) and the scorer threads."""
        self.engine.shutdown()
        if self.ctx.executor is not None:
            self.ctx.executor.shutdown(wait=False)
