"""App factory: `build_app(settings, runtime)` wires routes, errors, limits and metrics.

One serving object per endpoint family lives on `app.state`; nothing is module-global, so tests
build as many apps as they like (each with its own metrics registry).
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .disconnect import ClientDisconnected, iterate_or_cancel, run_or_cancel
from .errors import APIError, error_response, install_error_handlers
from .metrics import Metrics
from .protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
    ErrorResponse, ModelCard, ModelList,
)
from .serving import CompletionService, Kind, Runtime
from .settings import Settings

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 429, 500)}


class BodyLimit:
    """Pure ASGI middleware: reject bodies over `limit` bytes with an OpenAI-shaped 413."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"request body exceeds {self.limit} bytes",
                           code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(too_big)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await error_response(too_big)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def build_app(
    settings: Settings, runtime: Runtime, registry: CollectorRegistry = REGISTRY
) -> FastAPI:
    metrics = Metrics(registry)
    if hasattr(runtime.engine, "num_unfinished_requests"):
        metrics.watch_engine(runtime.engine)
    app = FastAPI(title="alignserve", version="0.1.0",
                  description="OpenAI-compatible serving with inference-time alignment.")
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.completions = CompletionService(settings, runtime, metrics)
    install_error_handlers(
        app, on_error=lambda e: metrics.errors.labels(e.type, str(e.status)).inc())
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _complete(request, body, "chat")

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        return await _complete(request, body, "text")

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        rt: Runtime = request.app.state.runtime
        return ModelList(data=[ModelCard(id=rt.model_name,
                                         max_model_len=getattr(rt.engine, "max_model_len", None))])

    @app.get("/health")
    async def health(request: Request):
        check = getattr(request.app.state.runtime.engine, "check_health", None)
        try:
            if check is not None:
                await check()
        except Exception:
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(request.app.state.registry),
                        media_type=CONTENT_TYPE_LATEST)

    return app


async def _complete(request: Request, body, kind: Kind):
    svc: CompletionService = request.app.state.completions
    metrics: Metrics = request.app.state.metrics
    t0 = time.perf_counter()
    slot = svc.admission.slot()
    slot.__enter__()  # raises a 429 APIError when full
    metrics.in_flight.inc()

    def release() -> None:
        metrics.in_flight.dec()
        slot.__exit__(None, None, None)

    try:
        prep = await svc.prepare(body, kind)
        endpoint = "chat" if kind == "chat" else "completions"
        metrics.requests.labels(prep.strategy_name, endpoint).inc()
        if prep.stream:
            events = _stream_then_release(request, svc, prep, t0, release)
            release = None  # the stream owns the slot now
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            answers = await run_or_cancel(request, svc.answers(prep))
        except ClientDisconnected:
            return Response(status_code=499)  # nobody is listening; engine work was aborted
        total = time.perf_counter() - t0
        metrics.latency.labels(prep.strategy_name).observe(total)
        return svc.response(prep, answers, total)
    finally:
        if release is not None:
            release()


async def _stream_then_release(request, svc: CompletionService, prep, t0: float, release):
    try:
        async for event in iterate_or_cancel(request, svc.stream(prep, t0)):
            yield event
        svc.metrics.latency.labels(prep.strategy_name).observe(time.perf_counter() - t0)
    finally:
        release()
