"""OpenTelemetry tracing (server/observability/tracing.py) on the fake engine, spans kept in
memory: the span tree of a request, its attributes, the trace context handed to the engine, and the
configuration errors of `--otlp-traces-endpoint`."""

from __future__ import annotations

import httpx
import pytest
from fakes import FakeEngine, make_app

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from cli.main import main  # noqa: E402
from server.observability import tracing as otel  # noqa: E402
from server.settings import Settings  # noqa: E402


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield otel.Tracing(provider), exporter
    provider.shutdown()


async def _post(engine, tracer, body, headers=None):
    app = make_app(engine, tracer=tracer)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await c.post("/v1/chat/completions", json=body, headers=headers or {})


def _tree(exporter):
    finished = exporter.get_finished_spans()
    (root,) = [s for s in finished if s.parent is None]
    children = [s for s in finished if s.parent is not None]
    assert all(s.parent.span_id == root.context.span_id for s in children)
    assert {s.context.trace_id for s in finished} == {root.context.trace_id}
    return root, children


async def test_best_of_n_span_tree(spans, caplog):
    tracer, exporter = spans
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
            "alignment": {"strategy": "best_of_n", "n": 3, "reward": "good_count",
                          "cost": "bad_count"}}
    with caplog.at_level("INFO", logger="alignserve.access"):
        r = await _post(FakeEngine(seed=1), tracer, body, {"X-Request-Id": "req-42"})
    assert r.status_code == 200, r.text
    root, children = _tree(exporter)
    assert root.name == "POST /v1/chat/completions"
    a = root.attributes
    usage = r.json()["usage"]
    assert a["alignserve.request_id"] == "req-42"
    assert a["alignserve.strategy"] == "best_of_n"
    assert a["gen_ai.request.model"] == "fake"
    assert a["alignserve.policy"] == "base"
    assert a["http.response.status_code"] == 200
    assert a["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.completion_tokens"] == usage["completion_tokens"]
    assert a["alignserve.generated_tokens"] >= usage["completion_tokens"]
    # one generate call of n = 3, then the reward and the cost scored (concurrently)
    (gen,) = [s for s in children if s.name == "engine.generate"]
    assert gen.attributes["gen_ai.request.n"] == 3
    assert gen.attributes["gen_ai.usage.completion_tokens"] == a["alignserve.generated_tokens"]
    scores = sorted(s.attributes["alignserve.scorer"] for s in children if s.name == "score")
    assert scores == ["bad_count", "good_count"]
    assert all(s.attributes["alignserve.candidates"] == 3 for s in children if s.name == "score")
    assert len(children) == 3
    # the access line names the trace, so logs and traces join
    (line,) = [rec.access for rec in caplog.records if hasattr(rec, "access")]
    assert line["trace_id"] == f"{root.context.trace_id:032x}"


async def test_speculative_rejection_one_span_per_track_pruned_ones_aborted(spans):
    from test_speculative_rejection import SPR, Inline, request

    from decoding.context import DecodeContext
    from server.observability import request_ids

    tracer, exporter = spans
    engine = FakeEngine(full_length=True, seed=5)
    ctx = DecodeContext(otel.TracedEngine(engine, tracer), Inline(), span=tracer.span)
    record = request_ids.RequestRecord("r1", "POST", "/v1/chat/completions")
    record.span = tracer.request_span("request", {})
    token = request_ids._CURRENT.set(record)
    try:
        res = await SPR.run(request(8, 0.5, 4), ctx)
    finally:
        request_ids._CURRENT.reset(token)
        record.span.end()
    _, children = _tree(exporter)
    tracks = [s for s in children if s.name == "engine.stream_sequence"]
    assert len(tracks) == 8
    aborted = [s for s in tracks if s.attributes.get("alignserve.aborted")]
    assert len(aborted) == sum(res.extra["rejected"]) == 7  # pruned tracks: aborted spans
    assert sorted(s.attributes["gen_ai.usage.completion_tokens"] for s in tracks) == sorted(
        len(c.sample.token_ids) for c in res.candidates)
    assert [s.attributes["alignserve.candidates"] for s in children if s.name == "score"][0] == 8


async def test_plain_stream_and_caller_trace_context(spans):
    tracer, exporter = spans
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    r = await _post(FakeEngine(seed=3), tracer, body,
                    {"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert r.status_code == 200 and "[DONE]" in r.text
    finished = exporter.get_finished_spans()
    (root,) = [s for s in finished if s.name.startswith("POST")]
    assert f"{root.context.trace_id:032x}" == trace_id  # joins the caller's trace
    assert f"{root.parent.span_id:016x}" == parent_id
    (stream,) = [s for s in finished if s.name == "engine.stream"]
    assert stream.parent.span_id == root.context.span_id
    assert stream.attributes["gen_ai.usage.completion_tokens"] >= 1


class HeaderEngine(FakeEngine):
    """Records the trace context an engine request would carry to vLLM."""

    seen: list

    async def generate(self, prompt_ids, n, sampling):
        self.seen = [*getattr(self, "seen", []), otel.engine_trace_headers()]
        return await super().generate(prompt_ids, n, sampling)


async def test_engine_requests_carry_their_spans_context(spans):
    tracer, exporter = spans
    engine = HeaderEngine(seed=4)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert (await _post(engine, tracer, body)).status_code == 200
    (gen,) = [s for s in exporter.get_finished_spans() if s.name == "engine.generate"]
    (headers,) = engine.seen
    assert headers["traceparent"].split("-")[2] == f"{gen.context.span_id:016x}"
    assert otel.engine_trace_headers() is None  # not leaked past the call


async def test_probes_have_no_spans_and_tracing_off_has_none(spans):
    tracer, exporter = spans
    app = make_app(FakeEngine(), tracer=tracer)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
    assert exporter.get_finished_spans() == ()
    assert make_app(FakeEngine()).state.tracer is None  # off by default


@pytest.mark.parametrize("url", ["http://collector:4317", "https://c.example/v1/traces",
                                 "collector:4317", "http://[::1]:4317"])
def test_endpoint_shapes_accepted(url):
    assert Settings(otlp_traces_endpoint=url).otlp_traces_endpoint == url


@pytest.mark.parametrize("url", ["not a url", "ftp://c:21", "collector", "http://"])
def test_bad_endpoint_is_one_line_exit_2(url, capsys, monkeypatch):
    monkeypatch.setenv("ALIGNSERVE_OTLP_TRACES_ENDPOINT", url)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "otlp_traces_endpoint" in err and "OTLP endpoint" in err


def test_missing_sdk_is_a_config_error(monkeypatch):
    from cli import serve as cli
    from server.settings import ConfigError

    def no_sdk(endpoint):
        raise ImportError("No module named 'opentelemetry.sdk'")

    monkeypatch.setattr(otel, "exporting_provider", no_sdk)
    with pytest.raises(ConfigError) as err:
        cli._tracer(Settings(otlp_traces_endpoint="http://c:4317"))
    assert err.value.setting == "otlp_traces_endpoint"
    assert cli._tracer(Settings()) is None


def test_vllm_gets_the_same_endpoint():
    from runtime.engine_args import engine_kwargs

    kw = engine_kwargs(Settings(otlp_traces_endpoint="http://c:4317"), {"otlp_traces_endpoint"})
    assert kw["otlp_traces_endpoint"] == "http://c:4317"
    assert "otlp_traces_endpoint" not in engine_kwargs(Settings(), set())
