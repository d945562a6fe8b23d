"""App factory: `build_app(settings, runtime)` wires routes, errors, limits, auth, lifecycle
and metrics.

One serving object per endpoint family lives on `app.state`; nothing is module-global, so tests
build as many apps as they like (each with its own metrics registry).

Middleware, outermost first: RequestIds (X-Request-Id on every response) → CatchAll (every
error answered here, never re-raised) → AuthGate (401/403 before anything is read) → DrainGate
(503 while draining) → BodyLimit (413) → routes. Per request: admission (429), token budget
(400, in `serving.py`), then the work runs under a `Cutoff` (504 on timeout, 503 past the drain
deadline) and is cancelled if the client disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from runtime.protocols import Runtime

from . import tracing
from .auth import AuthGate, KeyRing, warn_if_open
from .disconnect import ClientDisconnected, Cutoff, iterate_or_cancel, run_or_cancel
from .errors import (
    APIError,
    CatchAll,
    RequestTimeout,
    ServerDraining,
    error_response,
    install_error_handlers,
    to_api_error,
)
from .lifecycle import DrainGate, Lifecycle
from .metrics import Metrics
from .otel import TracedEngine, TraceRequests, Tracing
from .policies import PolicyManager
from .policies import router as policy_router
from .policy_file import PolicyFileWatcher
from .protocol import (
    AdminStatus,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ProbeStatus,
)
from .serving import CompletionService, Kind
from .settings import Settings
from .tokenizer_routes import install_tokenizer_routes
from .tracing import RequestIds

# Declared in the OpenAPI schema (the fuzz tests hold the app to it).
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503, 504)}
_COMPLETION = {**_ERRORS, 200: {"content": {"text/event-stream": {}},
                                "description": "JSON, or SSE chunks with `stream: true`"}}
_LIST_ERRORS = {code: {"model": ErrorResponse} for code in (401, 503)}
_ADMIN_ERRORS = {code: {"model": ErrorResponse} for code in (401, 403)}
_PROBE = {503: {"model": ProbeStatus}}
POLICY_HEADER = "X-Alignserve-Policy"  # the policy that answered (server/policies.py)
# Streams through proxies: never cache, never buffer (nginx honours X-Accel-Buffering).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
    settings: Settings, runtime: Runtime, registry: CollectorRegistry = REGISTRY,
    tracer: Tracing | None = None,
) -> FastAPI:
    """`tracer`: OpenTelemetry spans (server/otel.py); None: from `otlp_traces_endpoint`
    (off when unset)."""
    keys = KeyRing.from_settings(settings)  # bad key configuration fails here, at start-up
    warn_if_open(keys, settings)
    if tracer is None and settings.otlp_traces_endpoint:
        tracer = Tracing.to_endpoint(settings.otlp_traces_endpoint)
    if tracer is not None:  # engine and score calls become child spans of each request
        runtime = traced_runtime(runtime, tracer)
    metrics = Metrics(registry)
    metrics.watch_engine(runtime.engine)
    metrics.watch_remote_scorers(runtime.scorers)
    completions = CompletionService(settings, runtime, metrics)
    lifecycle = Lifecycle(completions.admission, metrics, settings.retry_after_s)
    policies = PolicyManager(runtime, settings, metrics)  # hot-swap, /admin/policies
    policy_file = (PolicyFileWatcher(policies, settings.policy_file, settings.policy_file_poll_s)
                   if settings.policy_file else None)  # fleet-wide active policy

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def start() -> None:
            if policy_file is not None:  # ready only once serving the file's policy
                await policy_file.run_until_ready()
                app.state.policy_watch = asyncio.ensure_future(policy_file.watch())
            await lifecycle.warm_up(runtime.engine)

        warm_up = asyncio.ensure_future(start())
        try:
            yield
        finally:
            warm_up.cancel()
            if getattr(app.state, "policy_watch", None) is not None:
                app.state.policy_watch.cancel()
            lifecycle.stopped()

    app = FastAPI(title="alignserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible serving with inference-time alignment.")
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.completions = completions
    app.state.lifecycle = lifecycle
    app.state.keys = keys
    app.state.policies = policies
    app.state.policy_file = policy_file
    app.state.tracer = tracer

    def count(err: APIError) -> None:
        metrics.errors.labels(err.type, str(err.status)).inc()

    install_error_handlers(app, on_error=count)
    app.include_router(policy_router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(DrainGate, lifecycle=lifecycle, on_error=count)
    app.add_middleware(AuthGate, keys=keys, on_error=count)
    app.add_middleware(CatchAll, on_error=count)  # outermost but these two: nothing escapes it
    if tracer is not None:  # one span per request, just inside RequestIds (it reads the record)
        app.add_middleware(TraceRequests, tracing_=tracer)
    # outermost, added after CatchAll: every response (401s, 500s too) carries the id
    app.add_middleware(RequestIds)
    install_tokenizer_routes(app)  # /tokenize, /detokenize, /version (server/tokenizer_routes.py)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses=_COMPLETION)
    async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response):
        return await _complete(request, body, "chat", response)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_COMPLETION)
    async def completions(body: CompletionRequest, request: Request, response: Response):
        return await _complete(request, body, "text", response)

    @app.get("/v1/models", response_model=ModelList, responses=_LIST_ERRORS)
    async def models(request: Request) -> ModelList:
        rt: Runtime = request.app.state.runtime
        max_len = rt.engine.max_model_len
        adapters = [ModelCard(id=name, max_model_len=max_len, parent=rt.model_name)
                    for name in rt.adapters]  # LoRA adapters (server/policies.py)
        return ModelList(data=[ModelCard(id=rt.model_name, max_model_len=max_len), *adapters])

    @app.get("/health", response_model=ProbeStatus, responses=_PROBE)
    async def health(request: Request):
        try:
            await request.app.state.runtime.engine.check_health()
        except Exception:
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready", response_model=ProbeStatus, responses=_PROBE)
    async def ready(request: Request):
        """Readiness: 200 once warmed up, 503 while loading, draining or unhealthy."""
        lc: Lifecycle = request.app.state.lifecycle
        if lc.state != "ready":
            return JSONResponse({"status": lc.state}, status_code=503)
        return await health(request)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(request.app.state.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/status", response_model=AdminStatus, responses=_ADMIN_ERRORS)
    async def admin_status(request: Request) -> AdminStatus:
        """Operator view (admin key): lifecycle state, load and limits. Never shows keys."""
        st = request.app.state
        engine = st.runtime.engine

        return AdminStatus(state=st.lifecycle.state, model=st.runtime.model_name,
                           requests_in_flight=st.completions.admission.active,
                           max_concurrent_requests=st.settings.max_concurrent_requests,
                           engine_requests_unfinished=engine.num_unfinished_requests(),
                           user_keys=st.keys.user_key_count, policy=st.policies.active,
                           policy_file=st.policy_file.status() if st.policy_file else None)

    return app


def traced_runtime(runtime: Runtime, tracer: Tracing) -> Runtime:
    """A copy of `runtime` whose engine calls (plain streams too) and score calls are spans."""
    engine = TracedEngine(runtime.engine, tracer)
    ctx = dataclasses.replace(runtime.ctx, engine=engine, span=tracer.span)
    return dataclasses.replace(runtime, engine=engine, ctx=ctx)


async def _complete(request: Request, body, kind: Kind, response: Response):
    svc: CompletionService = request.app.state.completions
    metrics: Metrics = request.app.state.metrics
    settings: Settings = request.app.state.settings
    cutoff = Cutoff(settings.request_timeout_s, request.app.state.lifecycle.abort,
                    settings.retry_after_s)
    t0 = time.perf_counter()
    slot = svc.admission.slot()
    slot.__enter__()  # raises a 429 APIError when full
    metrics.in_flight.inc()

    # Taken once the request is valid, held to its last byte (streams: last event): a policy
    # swap waits for it, and during a swap it queues here (server/policies.py).
    lease = request.app.state.policies.lease()

    def release() -> None:
        metrics.in_flight.dec()
        lease.release()
        slot.__exit__(None, None, None)

    try:
        record = tracing.current()
        if record is not None:
            record.strategy = body.alignment.strategy if body.alignment else "none"
        prep = await svc.prepare(body, kind)
        prep.policy = await lease.acquire()
        policy = {POLICY_HEADER: prep.policy}
        if record is not None:
            record.policy, record.model = prep.policy, prep.model
        response.headers.update(policy)
        endpoint = "chat" if kind == "chat" else "completions"
        metrics.requests.labels(prep.strategy_name, endpoint).inc()
        if prep.stream:
            events = _stream_then_release(request, svc, prep, t0, cutoff, release)
            release = None  # the stream owns the slot now
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={**policy, **SSE_HEADERS})
        try:
            answers = await run_or_cancel(request, svc.answers(prep), cutoff)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody is listening; engine work was aborted
        total = time.perf_counter() - t0
        metrics.latency.labels(prep.strategy_name).observe(total)
        # the client sees its first token with the whole response
        metrics.time_to_first_token.labels(prep.strategy_name, prep.model,
                                           prep.policy).observe(total)
        svc.note_answers(prep, answers)
        return svc.response(prep, answers, total)
    finally:
        if release is not None:
            release()


async def _stream_then_release(request, svc: CompletionService, prep, t0: float,
                               cutoff: Cutoff, release):
    try:
        async for event in iterate_or_cancel(request, svc.stream(prep, t0), cutoff):
            yield event
        svc.metrics.latency.labels(prep.strategy_name).observe(time.perf_counter() - t0)
    except (RequestTimeout, ServerDraining) as exc:  # headers are sent: report in-band
        yield svc.error_event(to_api_error(exc))
        yield "data: [DONE]\n\n"
    finally:
        release()
