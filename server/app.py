"""App factory: `build_app(settings, runtime)` wires routes, errors, limits, auth, lifecycle
and metrics.

One serving object per endpoint lives on `app.state` (`chat`, `completions`, sharing one
`ServingCore`); routes are APIRouters (server/routes/); nothing is module-global, so tests
build as many apps as they like (each with its own metrics registry).

Middleware, outermost first: RequestIds (X-Request-Id on every response) → CatchAll (every
error answered here, never re-raised) → AuthGate (401/403 before anything is read) → DrainGate
(503 while draining) → BodyLimit (413) → routes. Per request: admission (429), token budget
(400, in server/serving/resolve.py), then the work runs under a `Cutoff` (504 on timeout, 503 past the drain
deadline) and is cancelled if the client disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence

from fastapi import FastAPI
from prometheus_client import REGISTRY, CollectorRegistry

from decoding.dual import DualSolution
from runtime.ensemble import is_composite
from runtime.protocols import Runtime
from runtime.scorers import UnknownScorer
from runtime.settings import ConfigError

from .auth import AuthGate, KeyRing, warn_if_open
from .errors import (
    APIError,
    BodyTooLarge,
    CatchAll,
    error_response,
    install_error_handlers,
    to_api_error,
)
from .lifecycle import DrainGate, Lifecycle
from .observability.metrics import Metrics
from .observability.request_ids import RequestIds
from .observability.tracing import TracedEngine, TraceRequests, Tracing
from .policy.file import PolicyFileWatcher
from .policy.manager import PolicyManager
from .routes import ROUTERS
from .routes.tokenizer import package_version
from .serving import Admission, ChatServing, CompletionServing, ResponsesServing, ServingCore
from .serving.render import StrictJSONResponse
from .settings import Settings


class BodyLimit:
    """Pure ASGI middleware: reject bodies over `limit` bytes with an OpenAI-shaped 413."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(to_api_error(BodyTooLarge(self.limit)))(
                scope, receive, send)
        seen = 0

        async def limited_receive():
            # A chunked body has no content-length: count it as it arrives. Raised inside the
            # app, so it is an HTTPException (FastAPI makes anything else a 400) → 413.
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


def build_app(
    settings: Settings, runtime: Runtime, registry: CollectorRegistry = REGISTRY,
    tracer: Tracing | None = None,
) -> FastAPI:
    """`tracer`: OpenTelemetry spans (server/observability/tracing.py); None: from
    `otlp_traces_endpoint` (off when unset)."""
    keys = KeyRing.from_settings(settings)  # bad key configuration fails here, at start-up
    warn_if_open(keys, settings)
    if tracer is None and settings.otlp_traces_endpoint:
        tracer = Tracing.to_endpoint(settings.otlp_traces_endpoint)
    if tracer is not None:  # engine and score calls become child spans of each request
        runtime = traced_runtime(runtime, tracer)
    metrics = Metrics(registry)
    metrics.watch_engine(runtime.engine)
    metrics.watch_remote_scorers(runtime.scorers)
    admission = Admission(settings.max_concurrent_requests, settings.retry_after_s)
    lifecycle = Lifecycle(admission, metrics, settings.retry_after_s)
    policies = PolicyManager(runtime, settings, metrics)  # hot-swap, /admin/policies
    metrics.watch_capacity(admission, policies.gate)  # slots and leases held: leaks show
    core = ServingCore(settings, runtime, metrics, admission, lifecycle, policies)
    presets = [p.alignment.get(k) or "" for p in core.resolver.presets
               for k in ("reward", "cost", "value")]
    seal_scorers(runtime, settings, core.resolver.dual, presets)  # requests load no models now

    app = FastAPI(title="alignserve", version=package_version(), lifespan=_lifespan,
                  default_response_class=StrictJSONResponse,  # no NaN/Infinity literals out
                  description="OpenAI-compatible serving with inference-time alignment.")
    st = app.state
    st.settings, st.runtime, st.metrics, st.registry, st.keys = (
        settings, runtime, metrics, registry, keys)
    st.admission, st.lifecycle, st.policies, st.serving = admission, lifecycle, policies, core
    st.chat, st.completions = ChatServing(core), CompletionServing(core)  # one per endpoint
    st.responses = ResponsesServing(core)  # /v1/responses, on the chat path
    st.policy_file = (PolicyFileWatcher(policies, settings.policy_file,
                                        settings.policy_file_poll_s)
                      if settings.policy_file else None)  # fleet-wide active policy
    st.policy_watch = None
    st.tracer = tracer

    def count(err: APIError) -> None:
        metrics.errors.labels(err.type, str(err.status)).inc()

    install_error_handlers(app, on_error=count)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(DrainGate, lifecycle=lifecycle, on_error=count)
    app.add_middleware(AuthGate, keys=keys, on_error=count)
    app.add_middleware(CatchAll, on_error=count)  # outermost but these two: nothing escapes it
    if tracer is not None:  # one span per request, just inside RequestIds (it reads the record)
        app.add_middleware(TraceRequests, tracing_=tracer)
    # outermost, added after CatchAll: every response (401s, 500s too) carries the id
    app.add_middleware(RequestIds)
    return app


def seal_scorers(runtime: Runtime, settings: Settings, dual: DualSolution | None,
                 more: Sequence[str] = ()) -> None:
    """Load the `hf:` scorers the operator configured (the default reward, the dual's reward
    and cost, `scorers`, `more`: the presets'), then seal the registry: a request may name only
    those, the built-ins, value heads and remote scorers (docs/security.md). A model that does
    not load stops start-up with the loader's reason (ConfigError: one line, exit 2)."""
    extra = settings.scorers or ""  # --scorer
    names = [settings.default_reward, *(n.strip() for n in extra.split(",")), *more]
    if dual is not None:
        names += [dual.reward, dual.cost or ""]
    try:
        # hf: models, and composites (runtime/ensemble.py) whose members may be hf: models;
        # the other names are built-ins (lazy) or were registered by build_runtime
        runtime.scorers.preload([n for n in names if n and (n.startswith("hf:")
                                                            or is_composite(n))])
    except UnknownScorer as exc:
        raise ConfigError("scorers", str(exc)) from None
    runtime.scorers.seal()


def traced_runtime(runtime: Runtime, tracer: Tracing) -> Runtime:
    """A copy of `runtime` whose engine calls (plain streams too) and score calls are spans."""
    engine = TracedEngine(runtime.engine, tracer)
    ctx = dataclasses.replace(runtime.ctx, engine=engine, span=tracer.span)
    return dataclasses.replace(runtime, engine=engine, ctx=ctx)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    """Warm up in the background (the policy file first, when one is followed); /ready says
    when done. Shutdown stops the watcher and marks the lifecycle stopped."""
    st = app.state

    async def start() -> None:
        if st.policy_file is not None:  # ready only once serving the file's policy
            await st.policy_file.run_until_ready()
            st.policy_watch = asyncio.ensure_future(st.policy_file.watch())
        await st.lifecycle.warm_up(st.runtime.engine)

    warm_up = asyncio.ensure_future(start())
    try:
        yield
    finally:
        warm_up.cancel()
        if st.policy_watch is not None:
            st.policy_watch.cancel()
        st.lifecycle.stopped()
