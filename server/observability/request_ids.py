"""Traceable requests: a request id per HTTP request, in every log line and engine request id,
and one access log line per request (text or JSON).

`RequestIds` (pure ASGI, outermost) takes a valid client `X-Request-Id` or makes one, keeps a
`RequestRecord` in a context variable for the request's whole life (tasks the request starts
inherit it: strategies, engine calls, the stream body), echoes the id on every response
(errors from inner middleware too), and writes the access line once the last byte went out.
The serving code fills in what only it knows (strategy, tokens, policy) through `current()`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from runtime import context as request_context

HEADER = "X-Request-Id"
_VALID = re.compile(r"^[A-Za-z0-9._:@+=/-]{1,128}$")  # what is safe in logs and engine ids
_QUIET = ("/health", "/ready", "/metrics")  # probes and scrapes: access lines at DEBUG only
access_log = logging.getLogger("alignserve.access")


@dataclass
class RequestRecord:
    id: str
    method: str
    path: str
    t0: float = field(default_factory=time.perf_counter)
    status: int | None = None
    strategy: str | None = None
    model: str | None = None
    policy: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    generated_tokens: int | None = None
    generate_s: float | None = None
    score_s: float | None = None
    first_token_s: float | None = None
    trace_id: str | None = None  # OpenTelemetry (observability/tracing.py), when tracing is on
    span: Any = field(default=None, repr=False)  # the request's span (observability/tracing.py)

    def line(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("t0", "span") and getattr(self, f.name) is not None}
        out["latency_s"] = round(time.perf_counter() - self.t0, 4)
        for k in ("generate_s", "score_s", "first_token_s"):
            if k in out:
                out[k] = round(out[k], 4)
        return out


_CURRENT: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "alignserve_request", default=None)


def current() -> RequestRecord | None:
    return _CURRENT.get()


def current_request_id() -> str | None:
    record = _CURRENT.get()
    return record.id if record else None


def request_id_from(raw: bytes | None) -> str:
    """The client's id when it is safe to log and to embed in engine ids, else a fresh one."""
    if raw:
        text = raw.decode("latin-1")
        if _VALID.match(text):
            return text
    return uuid.uuid4().hex


_MAX_LOGGED = 2048  # characters of a path (or field) in an access line


def log_safe(text: str) -> str:
    """`text` fit for one log line: control and other non-printable characters (the decoded
    path's %0A, %0D, ESC...) escaped as \\xNN / \\uNNNN, so a client cannot end the line and
    forge another or drive a terminal; long values are cut (with '...')."""
    if text.isprintable() and len(text) <= _MAX_LOGGED:
        return text
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                  for c in text[:_MAX_LOGGED])
    return out + ("..." if len(text) > _MAX_LOGGED else "")


def _spaced(text: str) -> str:
    return text.replace(" ", "\\x20")


class RequestIds:
    """Pure ASGI middleware; see the module docstring."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = dict(scope.get("headers") or []).get(HEADER.lower().encode())
        record = RequestRecord(request_id_from(raw), log_safe(scope.get("method", "")),
                               log_safe(scope.get("path", "")))
        token = _CURRENT.set(record)
        id_token = request_context.request_id.set(record.id)  # the engine's request ids

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != HEADER.lower().encode()]
                message = {**message, "headers": [*headers,
                                                  (HEADER.lower().encode(), record.id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            level = logging.DEBUG if record.path in _QUIET else logging.INFO
            line = record.line()
            # spaces too in the text line: a value cannot pose as further fields
            access_log.log(level, "%s %s %s %s", record.method, _spaced(record.path),
                           record.status if record.status is not None else 499,
                           " ".join(f"{k}={_spaced(log_safe(str(v)))}" for k, v in line.items()
                                    if k not in ("id", "method", "path", "status")),
                           extra={"access": line})
            request_context.request_id.reset(id_token)
            _CURRENT.reset(token)


class _RequestIdFilter(logging.Filter):
    """Stamps every record with the id of the request it was logged for ('-': none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message (+ access fields)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "request_id": getattr(record, "request_id", "-"), "message": record.getMessage()}
        access = getattr(record, "access", None)  # set through `extra=` by the access log
        if isinstance(access, dict):
            out.update(access=access)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str, fmt: str = "text") -> None:
    """Root logging for `alignserve serve`: text (default) or JSON lines, request ids on all."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
