"""The id of the request being served, in a context variable: the server's request-id middleware
(server/observability/request_ids.py) sets it, the engine (engine.py) prefixes its request ids
with it so that engine log lines and aborts name the HTTP request. Offline tools never set
it."""

from __future__ import annotations

import contextvars
from typing import Any

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "alignserve_request_id", default=None)


def current_request_id() -> str | None:
    return request_id.get()


# The engine span whose trace context the next engine request carries:
# server/observability/tracing.py sets (tracing, span) around each engine call,
# runtime/engine.py passes its headers to vLLM.
engine_span: contextvars.ContextVar[Any] = contextvars.ContextVar("alignserve_engine_span",
                                                                  default=None)


def engine_trace_headers() -> dict[str, str] | None:
    """Trace context for the engine request being started now (None: tracing off)."""
    current = engine_span.get()
    return None if current is None else current[0].headers_of(current[1])

