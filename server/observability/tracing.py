"""OpenTelemetry tracing, off by default (`otlp_traces_endpoint`).

When on, every HTTP request is one span (`TraceRequests`, inside `request_ids.RequestIds`), with
the request id, strategy, model, policy, status and token counts as attributes once it ends,
and every engine call (`TracedEngine`: generate, stream, stream_sequence, tilted) and every
score call (`DecodeContext.span`, a hook of decoding/) is a child span of it. vLLM's own
tracing is switched on with the same endpoint (the setting is passed to AsyncEngineArgs,
runtime/engine_args.py), and each engine request carries the W3C trace context of its engine
span (`engine_trace_headers`, read by runtime/engine.py), so vLLM's `llm_request` spans (queue
time, prefill, decode) sit under the call that made them in one trace.

Spans are never made "current" (no otel context attach): the parent is found through the
request record (a context variable that every task of the request inherits), which works the
same in coroutines, async generators that are closed early (speculative rejection's pruned
tracks) and worker threads. A client's `traceparent` header makes the request span a child of
the caller's trace.

The SDK and the OTLP exporter are imported only when tracing is on, so nothing needs them
otherwise. The exporter protocol follows vLLM's convention: gRPC unless
OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf, so one endpoint serves both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from typing import Any

from runtime.context import engine_span as _ENGINE_SPAN
from runtime.context import engine_trace_headers  # noqa: F401  (re-exported for tests)
from runtime.settings import check_endpoint  # noqa: F401  (re-exported)

from . import request_ids

SERVICE_NAME = "alignserve"
_SKIP = ("/health", "/ready", "/metrics")  # probes and scrapes: no spans



def exporting_provider(endpoint: str):
    """A TracerProvider that batches spans to the OTLP collector at `endpoint`. ImportError
    when the SDK or the exporter is not installed (the CLI names the packages)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter: SpanExporter = OTLPSpanExporter(endpoint=endpoint)
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        exporter = GrpcExporter(endpoint=endpoint, insecure=not endpoint.startswith("https"))
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class Tracing:
    """Spans of one app, from `provider` (an SDK TracerProvider; tests pass one with an
    in-memory exporter). Not the global provider: vLLM sets that one for its own spans."""

    def __init__(self, provider) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("alignserve")
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def to_endpoint(cls, endpoint: str) -> Tracing:
        return cls(exporting_provider(endpoint))

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what the batch processor still holds

    # -- spans ---------------------------------------------------------------------------

    def request_span(self, name: str, headers: Mapping[str, str]):
        parent = self._propagator.extract(headers) if "traceparent" in headers else None
        return self.tracer.start_span(name, context=parent, kind=self._trace.SpanKind.SERVER)

    def child(self, name: str, attrs: Mapping[str, Any]):
        """A span under the current request's span (a root span outside any request)."""
        record = request_ids.current()
        parent = getattr(record, "span", None)
        ctx = self._trace.set_span_in_context(parent) if parent is not None else None
        return self.tracer.start_span(name, context=ctx, attributes=dict(attrs))

    @contextlib.contextmanager
    def span(self, name: str, attrs: Mapping[str, Any]) -> Iterator[Any]:
        """A child span around a block; an exception marks it failed (cancellation too)."""
        span = self.child(name, attrs)
        try:
            yield span
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            span.end()

    def headers_of(self, span) -> dict[str, str]:
        """The W3C trace context of `span` as headers (vLLM's `trace_headers`)."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        return carrier


def _failed(span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    if isinstance(exc, GeneratorExit):  # closed early on purpose (a pruned track)
        span.set_attribute("alignserve.aborted", True)
        return
    span.set_attribute("alignserve.aborted", True)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


class TraceRequests:
    """Pure ASGI middleware (inside RequestIds, whose record it reads): one span per request,
    its attributes filled from the record once the response is over."""

    def __init__(self, app, tracing_: Tracing) -> None:
        self.app, self.tracing = app, tracing_

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in _SKIP:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers") or []}
        span = self.tracing.request_span(f"{scope.get('method', '')} {scope.get('path', '')}",
                                         headers)
        record = request_ids.current()
        if record is not None:
            record.span = span
            record.trace_id = f"{span.get_span_context().trace_id:032x}"
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            if record is not None:
                span.set_attributes(request_attributes(record))
                if (record.status or 500) >= 500:
                    from opentelemetry.trace import Status, StatusCode

                    span.set_status(Status(StatusCode.ERROR, f"HTTP {record.status}"))
            span.end()


def request_attributes(record) -> dict[str, Any]:
    """The request span's attributes (None values left out: otel refuses them)."""
    attrs = {"alignserve.request_id": record.id, "http.request.method": record.method,
             "url.path": record.path, "http.response.status_code": record.status,
             "alignserve.strategy": record.strategy, "gen_ai.request.model": record.model,
             "alignserve.policy": record.policy,
             "gen_ai.usage.prompt_tokens": record.prompt_tokens,
             "gen_ai.usage.completion_tokens": record.completion_tokens,
             "alignserve.generated_tokens": record.generated_tokens,
             "alignserve.generate_s": record.generate_s, "alignserve.score_s": record.score_s,
             "alignserve.first_token_s": record.first_token_s}
    return {k: v for k, v in attrs.items() if v is not None}


class TracedEngine:
    """A `decoding.Engine` whose sampling calls are child spans of the request (calls, n,
    max_tokens, prompt and generated tokens); everything else is the wrapped engine's."""

    def __init__(self, engine, tracing_: Tracing) -> None:
        self._engine, self._tracing = engine, tracing_

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def _start(self, name: str, prompt_ids: Sequence[int], n: int, sampling):
        return self._tracing.child(f"engine.{name}", {
            "gen_ai.request.n": n, "gen_ai.request.max_tokens": sampling.max_tokens,
            "gen_ai.usage.prompt_tokens": len(prompt_ids)})

    async def generate(self, prompt_ids, n: int, sampling):
        span = self._start("generate", prompt_ids, n, sampling)
        token = _ENGINE_SPAN.set((self._tracing, span))
        try:
            samples = await self._engine.generate(prompt_ids, n, sampling)
            span.set_attribute("gen_ai.usage.completion_tokens",
                               sum(len(s.token_ids) for s in samples))
            return samples
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            _ENGINE_SPAN.reset(token)
            span.end()

    def stream(self, prompt_ids, sampling) -> AsyncGenerator[Any, None]:
        return self._spanned("stream", prompt_ids, 1, sampling,
                             self._engine.stream(prompt_ids, sampling))

    def stream_sequence(self, prompt_ids, sampling) -> AsyncGenerator[Any, None]:
        return self._spanned("stream_sequence", prompt_ids, 1, sampling,
                             self._engine.stream_sequence(prompt_ids, sampling))

    def tilted(self, prompt_ids, sampling, tilt) -> AsyncGenerator[Any, None]:
        return self._spanned("tilted", prompt_ids, 1, sampling,
                             self._engine.tilted(prompt_ids, sampling, tilt))

    async def _spanned(self, name, prompt_ids, n, sampling, inner) -> AsyncGenerator[Any, None]:
        """Re-yield `inner`'s deltas inside a span; closing or cancelling this closes `inner`
        at once (its abort runs now) and marks the span aborted."""
        span = self._start(name, prompt_ids, n, sampling)
        tokens, first = 0, True
        try:
            async with contextlib.aclosing(inner):
                while True:
                    # The engine request starts on the first step: only it sees the span
                    # (set and reset within one step, so no other call inherits it).
                    token = _ENGINE_SPAN.set((self._tracing, span)) if first else None
                    try:
                        delta = await inner.__anext__()
                    except StopAsyncIteration:
                        break
                    finally:
                        if token is not None:
                            _ENGINE_SPAN.reset(token)
                        first = False
                    tokens += len(delta.token_ids)
                    yield delta
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            span.set_attribute("gen_ai.usage.completion_tokens", tokens)
            span.end()
