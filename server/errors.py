"""OpenAI-shaped errors, mapped in one handler table.

Every failure leaves as `{"error": {"message", "type", "param", "code"}}`. Client mistakes are
4xx with a message that says what to change; anything unexpected is a 500 with a generic message
(the exception is logged, never echoed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from decoding.errors import EngineRejected, EngineUnavailable
from decoding.strategies import STRATEGIES
from runtime.batching import NonFiniteScore
from runtime.remote_scorer import UpstreamUnavailable  # noqa: F401  (re-exported)

from .protocol import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


class Unauthenticated(Exception):
    """No valid key for the route (401). The message never echoes the key presented."""

    def __init__(self, message: str, code: str = "invalid_api_key") -> None:
        super().__init__(message)
        self.message, self.code = message, code


class Forbidden(Exception):
    """A valid key without the right to this route, or a disabled route (403)."""

    def __init__(self, message: str, code: str = "insufficient_permissions") -> None:
        super().__init__(message)
        self.message, self.code = message, code


class ServerDraining(Exception):
    """The server is shutting down: new work is refused, unfinished work past the drain
    deadline is cancelled (503 + Retry-After: another replica can take it)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


class RequestTimeout(Exception):
    """The request ran past `request_timeout_s`; its engine work was aborted (504)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"request timed out after {seconds:g} s; its work was cancelled")
        self.seconds = seconds


class BodyTooLarge(StarletteHTTPException):
    """A request body past `max_body_bytes` (413). An HTTPException because it is raised inside
    the app's `receive` (server/app.py BodyLimit, chunked bodies): FastAPI's body parsing turns
    any other exception there into a 400 but lets HTTPExceptions through to the table."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")
        self.limit = limit


def error_json(err: APIError) -> dict:
    body = ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code)
    return ErrorResponse(error=body).model_dump()


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_json(err), status_code=err.status, headers=err.headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    # union members add their type to the location ("str", "function-after[...]"), chat
    # messages their role ("messages.0.user.content"): not fields
    raw = [str(p) for p in first.get("loc", ()) if p != "body"]
    loc = [p for i, p in enumerate(raw) if p not in _TYPE_TAGS
           and (p == "[key]" or not any(c in p for c in "[-("))
           and not (p in _ROLES and i >= 2 and raw[i - 2] == "messages")]
    if first.get("type") == "json_invalid":
        return APIError(400, f"Invalid JSON body: {first.get('msg')}", code="invalid_json")
    if first.get("type") == "unknown_strategy":  # the `alignment` union's tag (protocol.py)
        given = first.get("input")
        name = given.get("strategy") if isinstance(given, dict) else given
        return APIError(400, f"unknown alignment strategy {name!r}; available: "
                        f"{', '.join(sorted(STRATEGIES))}", param="alignment.strategy",
                        code="unknown_strategy")
    if len(loc) > 2 and loc[0] == "alignment" and loc[1] in STRATEGIES:
        strategy = loc.pop(1)  # the union member's tag: the field is alignment.<name>
        if first.get("type") == "extra_forbidden":
            option = ".".join(loc)
            return APIError(400, f"{option} is not an option of strategy {strategy!r}",
                            param=option, code="invalid_value")
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(
        400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value"
    )


# FastAPI's `responses=` argument: status -> OpenAPI response object (or {"model": ...}).
OpenAPIResponses = dict[int | str, dict[str, Any]]


def error_responses(*codes: int, model: type = ErrorResponse) -> OpenAPIResponses:
    """The OpenAPI `responses=` entries for `codes`, each answered by `model`."""
    return {code: {"model": model} for code in codes}


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def _http_error(exc: StarletteHTTPException) -> APIError:
    kind = _STATUS_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500
                             else "server_error")
    return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers)


# A dead engine does not come back by itself: the pod's liveness probe (/health, 503 now)
# restarts it, which takes about as long as an engine start-up. Clients should go elsewhere.
ENGINE_RETRY_AFTER_S = 30


def _engine_rejected(exc: EngineRejected) -> APIError:
    param = exc.param
    return APIError(400, f"{param}: {exc}" if param else str(exc), param=param,
                    code="invalid_value")


def _unexpected(exc: BaseException) -> APIError:
    log.exception("unhandled error", exc_info=exc)
    return APIError(500, "internal server error", type="server_error", code="internal_error")


# The one table: exception type -> APIError. Order matters only through isinstance lookups.
ERROR_TABLE: dict[type[Exception], Callable[[Any], APIError]] = {
    APIError: lambda e: e,
    Unauthenticated: lambda e: APIError(401, e.message, type="authentication_error", code=e.code,
                                        headers={"WWW-Authenticate": "Bearer"}),
    Forbidden: lambda e: APIError(403, e.message, type="permission_error", code=e.code),
    ServerDraining: lambda e: APIError(503, e.message, type="server_error",
                                       code="server_shutting_down",
                                       headers={"Retry-After": str(e.retry_after_s)}),
    RequestTimeout: lambda e: APIError(504, str(e), type="timeout_error", code="request_timeout"),
    EngineRejected: _engine_rejected,
    EngineUnavailable: lambda e: APIError(503, str(e), type="server_error",
                                          code="engine_unavailable",
                                          headers={"Retry-After": str(ENGINE_RETRY_AFTER_S)}),
    UpstreamUnavailable: lambda e: APIError(
        e.status, e.message, type="server_error", code=e.code,
        headers={"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None),
    BodyTooLarge: lambda e: APIError(413, e.detail, code="request_too_large"),
    NonFiniteScore: lambda e: APIError(
        502 if e.scorer.startswith("remote:") else 500, str(e), type="server_error",
        code="reward_model_error" if e.scorer.startswith("remote:") else "invalid_score"),
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
    Exception: _unexpected,
}


def to_api_error(exc: BaseException) -> APIError:
    """The table's answer for `exc` (most specific class first), for code outside FastAPI's
    handlers: ASGI middleware and errors reported in-band on a stream."""
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls](exc)
    return _unexpected(exc)  # BaseException subclasses that are not Exceptions


class CatchAll:
    """Pure ASGI middleware, outermost of ours: an exception that reaches it becomes the table's
    JSON answer here. Starlette's own last-resort handler answers too but then re-raises, so
    uvicorn logs "Exception in ASGI application" and closes the client's keep-alive connection:
    the client's next request on it fails. Once a response has started nothing can be sent;
    the error is logged and the stream ends."""

    def __init__(self, app, on_error=None) -> None:
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            err = to_api_error(exc)
            if started:
                log.error("error after the response started: %s", err.message)
                return
            if self.on_error is not None:
                self.on_error(err)
            await error_response(err)(scope, receive, send)


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Register the table; `on_error(api_error)` lets metrics count errors by type."""

    def make(convert):
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            err = convert(exc)
            if on_error is not None:
                on_error(err)
            return error_response(err)

        return handler

    for exc_type, convert in ERROR_TABLE.items():
        app.add_exception_handler(exc_type, make(convert))
