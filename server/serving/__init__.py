"""Serving objects for /v1/chat/completions and /v1/completions (vLLM's entrypoint shape).

Data flow: validated pydantic request → `ResolvedRequest` (resolve.py: token prompts,
sampling, strategy and objective resolved against the registries; every limit checked at the
edge) → one `DecodeRequest` per (prompt, choice), run concurrently by the chosen strategy or
streamed (core.py) → OpenAI response or SSE chunks with the `alignment` accounting
(render.py, pure functions).

Modules, each importing only those before it: data (dataclasses) → admission → resolve →
render → core (shared by both endpoints) → ticket (one admitted request) → endpoints
(`ChatServing`, `CompletionServing`, each owning `create()`) → responses_events (the Responses
object and event stream) → responses (`ResponsesServing`: /v1/responses translated onto the chat
path).
"""

from .admission import Admission
from .core import ServingCore
from .data import Answer, Kind, Prompt, ResolvedRequest
from .endpoints import ChatServing, CompletionServing, chat_prompt, text_prompts
from .responses import ResponsesServing

__all__ = ["Admission", "Answer", "ChatServing", "CompletionServing", "Kind", "Prompt",
           "ResolvedRequest", "ResponsesServing", "ServingCore", "chat_prompt", "text_prompts"]
