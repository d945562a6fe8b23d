"""OpenAI/vLLM request fields: default resolution, every field reaching every engine call,
refusals naming field and strategy, logprobs, SSE keep-alives, request ids and the access log,
and vLLM's /tokenize, /detokenize and /version (all on the fakes)."""

import asyncio
import json
import logging
import math
import time

import httpx
import pytest
from fakes import FakeEngine, FakeQHead, make_app, sse_events

from server.fields import UNSUPPORTED, default_max_tokens, resolve_defaults
from server.observability import request_ids
from server.protocol import ChatCompletionRequest

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
BON = {"strategy": "best_of_n", "n": 3}
CONTROLS = {"presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.1,
            "logit_bias": {"3": -100}, "top_k": 5, "min_p": 0.05, "stop_token_ids": [7],
            "min_tokens": 2, "ignore_eos": True}


def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://test")


# ---------------------------------------------------------------- default resolution


def _chat(**fields):
    return ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **fields)


def test_omitted_controls_take_the_generation_config_then_neutral_values():
    model = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05}
    got = resolve_defaults(_chat(), model)
    assert got == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.0,
                   "repetition_penalty": 1.05, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    # what the request says wins, 0 included
    got = resolve_defaults(_chat(temperature=0, top_k=-1, min_p=0.1), model)
    assert (got["temperature"], got["top_k"], got["min_p"], got["top_p"]) == (0.0, 0, 0.1, 0.9)
    assert resolve_defaults(_chat(), {})["temperature"] == 1.0


@pytest.mark.parametrize("prompt, ctx, cap, model, budget, want", [
    (100, 2048, 1024, None, None, 1024),   # the cap
    (1500, 2048, 1024, None, None, 548),   # what the context leaves
    (100, 2048, 1024, 256, None, 256),     # generation_config max_new_tokens
    (100, 2048, 1024, None, 300, 300),     # the token budget per answer
    (2048, 2048, 1024, None, None, 1),     # a full prompt: the length check refuses it
])
def test_default_max_tokens(prompt, ctx, cap, model, budget, want):
    assert default_max_tokens(prompt, ctx, cap, model, budget) == want


async def test_omitted_max_tokens_is_what_the_context_leaves(engine):
    engine.max_model_len = 40
    async with _client(make_app(engine)) as c:
        r = await c.post("/v1/chat/completions", json={"messages": CHAT["messages"]})
    assert r.status_code == 200
    prompt_ids, _, sampling = engine.calls[-1]
    assert sampling.max_tokens == 40 - len(prompt_ids)


async def test_omitted_max_tokens_fits_the_token_budget(engine):
    async with _client(make_app(engine, max_request_tokens=100)) as c:
        r = await c.post("/v1/chat/completions", json={"messages": CHAT["messages"],
                                                       "alignment": {"strategy": "best_of_n",
                                                                     "n": 4}})
    assert r.status_code == 200
    assert engine.calls[-1][2].max_tokens == 25  # 100 // (1 prompt × 1 choice × 4)


async def test_generation_config_defaults_reach_the_engine(engine):
    engine.sampling_defaults = {"temperature": 0.3, "top_k": 7, "max_tokens": 5}
    async with _client(make_app(engine)) as c:
        r = await c.post("/v1/chat/completions", json={"messages": CHAT["messages"],
                                                       "top_p": 0.5})
    assert r.status_code == 200
    s = engine.calls[-1][2]
    assert (s.temperature, s.top_k, s.top_p, s.max_tokens) == (0.3, 7, 0.5, 5)


# ---------------------------------------------------------------- every engine call


@pytest.mark.parametrize("alignment", [None, BON, {"strategy": "soft_best_of_n", "n": 2}])
async def test_controls_reach_every_engine_call(engine, alignment):
    body = {**CHAT, **CONTROLS, **({"alignment": alignment} if alignment else {})}
    async with _client(make_app(engine)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert engine.calls
    for _, _, s in engine.calls:
        assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, 0.25, 1.1)
        assert (s.logit_bias, s.top_k, s.min_p) == (((3, -100.0),), 5, 0.05)
        assert (s.stop_token_ids, s.min_tokens, s.ignore_eos) == ((7,), 2, True)


@pytest.mark.parametrize("strategy", ["speculative_rejection", "blockwise_cd"])
async def test_continuing_strategies_carry_the_stateless_controls(engine, strategy):
    # each strategy's own option only: another strategy's is a 400 (test_api.py)
    option = {"speculative_rejection": {"decision_tokens": 4}, "blockwise_cd": {"block_tokens": 4}}
    body = {**CHAT, "max_tokens": 12, "logit_bias": {"3": -100}, "top_k": 5, "min_p": 0.05,
            "repetition_penalty": 1.1, "stop_token_ids": [7], "response_format": {"type": "text"},
            "alignment": {"strategy": strategy, "n": 2, **option[strategy]}}
    async with _client(make_app(FakeEngine(seed=3, full_length=True))) as c:
        app = c._transport.app
        r = await c.post("/v1/chat/completions", json=body)
        calls = app.state.runtime.engine.calls
    assert r.status_code == 200, r.text
    assert len(calls) > 1  # several engine calls: each one carries the controls
    for _, _, s in calls:
        assert (s.logit_bias, s.top_k, s.min_p, s.repetition_penalty, s.stop_token_ids) == (
            ((3, -100.0),), 5, 0.05, 1.1, (7,))
        assert s.structured is None


@pytest.mark.parametrize("rf, want", [
    ({"type": "json_object"}, ("json_object", "")),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
     ("json_schema", '{"type": "object"}')),
])
async def test_response_format_constrains_every_candidate(engine, rf, want):
    async with _client(make_app(engine)) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "response_format": rf,
                                                       "alignment": BON})
    assert r.status_code == 200
    assert {s.structured for _, _, s in engine.calls} == {want}


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("body, param", [
    # tools: auto (their default) needs a tool-call parser, which this server has none of
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),  # no tools
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]},
     "messages[0].tool_call_id"),  # answers no call
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]},
                   {"role": "user", "content": "x"}]}, "messages.0.tool_calls.0.function"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias.x.[key]"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"min_tokens": 9}, "min_tokens"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
])
async def test_unhonoured_fields_are_refused(client, body, param):
    r = await client.post("/v1/chat/completions", json={**CHAT, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("body, param", [({"best_of": 3}, "best_of"), ({"suffix": "!"}, "suffix")])
async def test_completion_only_fields_are_refused(client, body, param):
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, **body})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


_GIVEN = {"response_format": {"type": "json_object"}, "min_tokens": 1, "presence_penalty": 0.5,
          "frequency_penalty": 0.5, "top_logprobs": 2, "ignore_eos": True, "stop_token_ids": [3],
          "tools": [{"type": "function", "function": {"name": "f"}}]}


@pytest.mark.parametrize("field, strategy", sorted(
    (f, s) for f, refused in UNSUPPORTED.items() for s in refused))
async def test_a_strategy_refuses_what_it_cannot_honour(engine, field, strategy):
    app = make_app(engine)
    app.state.runtime.scorers.register(FakeQHead({0: 1.0}))
    body = {**CHAT, field: _GIVEN[field], "alignment": {"strategy": strategy, "value": "value:q"
                                                         if strategy == "tokenwise_cd" else None}}
    if field == "top_logprobs":
        body["logprobs"] = True
    async with _client(app) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and strategy in err["message"]
    assert not engine.calls  # refused before any engine work


SPR = {"strategy": "speculative_rejection", "n": 4, "alpha": 0.5, "decision_tokens": 2}
_LIFTED = {"response_format": {"type": "json_object"}, "min_tokens": 3, "presence_penalty": 0.5,
           "frequency_penalty": 0.25}


def test_speculative_rejection_refuses_nothing_it_once_could_not_resume():
    # one engine request per track: every field is the engine's to apply (server/fields.py)
    assert not [f for f, refused in UNSUPPORTED.items() if "speculative_rejection" in refused]


async def test_speculative_rejection_carries_every_field_to_every_track():
    engine = FakeEngine(seed=3, full_length=True)
    body = {**CHAT, "max_tokens": 12, **CONTROLS, **_LIFTED, "alignment": SPR}
    async with _client(make_app(engine)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(engine.calls) == 4  # one engine request per track, never resubmitted
    for _, n, s in engine.calls:
        assert n == 1 and s.max_tokens == 12
        assert s.structured == ("json_object", "")
        assert (s.min_tokens, s.presence_penalty, s.frequency_penalty) == (3, 0.5, 0.25)
        assert (s.logit_bias, s.stop_token_ids, s.ignore_eos) == (((3, -100.0),), (7,), True)


async def test_speculative_rejection_reports_the_chosen_tracks_logprobs():
    body = {**CHAT, "max_tokens": 10, "seed": 1, "logprobs": True, "top_logprobs": 2,
            "alignment": {**SPR, "return_candidates": True}}
    async with _client(make_app(FakeEngine(seed=4))) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    chosen = next(c for c in choice["alignment"]["candidates"]
                  if c["finish_reason"] is not None and c["text"] == choice["message"]["content"])
    assert len(content) == chosen["tokens"]
    assert math.isclose(sum(t["logprob"] for t in content), chosen["logprob"])
    assert all(len(t["top_logprobs"]) == 2 for t in content)


async def test_accepted_sdk_fields_have_no_effect(client):
    r = await client.post("/v1/chat/completions", json={
        **CHAT, "user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
        "parallel_tool_calls": False, "tool_choice": "none", "tools": []})
    assert r.status_code == 200


# ---------------------------------------------------------------- logprobs


async def test_chat_logprobs_of_the_chosen_answer(client):
    r = await client.post("/v1/chat/completions", json={
        **CHAT, "logprobs": True, "top_logprobs": 2,
        "alignment": {**BON, "return_candidates": True}})
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    chosen = next(c for c in choice["alignment"]["candidates"]
              if c["text"] == choice["message"]["content"])
    assert len(content) == chosen["tokens"]
    assert math.isclose(sum(t["logprob"] for t in content), chosen["logprob"])
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    assert all(len(t["top_logprobs"]) == 2 for t in content)


async def test_completion_logprobs_and_echo(client):
    r = await client.post("/v1/completions", json={"prompt": "hi you", "max_tokens": 6,
                                                   "logprobs": 1, "echo": True})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith("hi you")
    assert choice["text"][lp["text_offset"][0]:] == "".join(lp["tokens"])
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) == len(lp["top_logprobs"])


async def test_streamed_logprobs_add_up(client):
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True, "logprobs": True})
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    events = sse_events(r.text)
    tokens = [t for e in events for c in e["choices"] if c["logprobs"]
              for t in c["logprobs"]["content"]]
    text = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    assert tokens and "".join(t["token"] for t in tokens) == text


# ---------------------------------------------------------------- streams through proxies


async def test_keep_alives_while_best_of_n_chooses():
    """Driven by hand: the engine is held, so the strategy is still choosing while we read."""
    engine = FakeEngine(seed=1)
    engine.gate = asyncio.Event()
    app = make_app(engine, sse_keepalive_s=0.01)
    core = app.state.serving
    prep = await core.resolve(ChatCompletionRequest(**CHAT, stream=True, alignment=BON), "chat",
                              app.state.chat.prompts)
    events = core.stream(prep, time.perf_counter())
    first = await events.__anext__()
    assert '"role":"assistant"' in first  # the role chunk at once, before any engine work
    assert await events.__anext__() == ": keep-alive\n\n"
    assert await events.__anext__() == ": keep-alive\n\n"
    engine.gate.set()
    rest = [e async for e in events]
    assert rest[-1] == "data: [DONE]\n\n"
    assert any('"finish_reason":"' in e for e in rest)


# ---------------------------------------------------------------- request ids and logs


class _IdEngine(FakeEngine):
    """Records the request id each engine call runs under (the prefix of vLLM's ids)."""

    def __init__(self) -> None:
        super().__init__(seed=2)
        self.ids: list[str | None] = []

    async def generate(self, prompt_ids, n, sampling):
        self.ids.append(request_ids.current_request_id())
        return await super().generate(prompt_ids, n, sampling)


async def test_request_id_round_trip_engine_and_access_log(caplog):
    engine = _IdEngine()
    caplog.set_level(logging.INFO, logger="alignserve.access")
    async with _client(make_app(engine)) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "alignment": BON},
                         headers={"X-Request-Id": "trace-123"})
        bad = await c.post("/v1/chat/completions", json={**CHAT, "n": 99},
                           headers={"X-Request-Id": "trace-400"})
        made = await c.post("/v1/chat/completions", json=CHAT,
                            headers={"X-Request-Id": "bad id\twith spaces"})
    assert r.headers["x-request-id"] == "trace-123"
    assert r.json()["id"] == "chatcmpl-trace-123"
    assert engine.ids == ["trace-123", made.headers["x-request-id"]]  # every engine call
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "trace-400"
    assert made.headers["x-request-id"] != "bad id\twith spaces"
    assert len(made.headers["x-request-id"]) == 32
    lines = {rec.access["id"]: rec.access for rec in caplog.records if hasattr(rec, "access")}
    line = lines["trace-123"]
    assert (line["status"], line["strategy"], line["policy"]) == (200, "best_of_n", "base")
    assert line["completion_tokens"] >= 1 and line["generated_tokens"] >= line["completion_tokens"]
    assert line["prompt_tokens"] >= 1 and line["latency_s"] >= 0
    assert lines["trace-400"]["status"] == 400


async def test_errors_before_the_routes_carry_the_id():
    async with _client(make_app(api_keys="unit-user-key-1")) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "no-key"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "no-key"


def test_json_log_lines_carry_the_request_id():
    record = logging.LogRecord("alignserve.access", logging.INFO, __file__, 1, "POST %s", ("/x",),
                               None)
    record.request_id, record.access = "abc", {"status": 200}
    out = json.loads(request_ids.JsonFormatter().format(record))
    assert out["request_id"] == "abc" and out["message"] == "POST /x"
    assert out["access"] == {"status": 200}


async def test_user_visible_latency_metrics(client):
    await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    text = (await client.get("/metrics")).text
    assert 'alignserve:time_to_first_token_seconds_count{model="fake",policy="base",' \
           'strategy="none"} 1.0' in text
    assert "alignserve:inter_token_latency_seconds_count" in text


# ---------------------------------------------------------------- vLLM's extra endpoints


async def test_tokenize_detokenize_version(client):
    r = await client.post("/tokenize", json={"prompt": "good bad good"})
    assert r.json()["count"] == 3 and r.json()["tokens"] == [0, 1, 0]
    chat = await client.post("/tokenize", json={"messages": CHAT["messages"],
                                                "return_token_strs": True})
    assert chat.status_code == 200 and len(chat.json()["token_strs"]) == chat.json()["count"]
    d = await client.post("/detokenize", json={"tokens": [0, 1]})
    assert d.json() == {"prompt": " good bad"}
    assert (await client.post("/detokenize", json={"tokens": [10**6]})).status_code == 400
    assert (await client.post("/tokenize", json={"prompt": "x", "model": "nope"})).status_code \
        == 404
    v = (await client.get("/version")).json()
    assert v["version"]


async def test_tokenize_needs_a_key_when_keys_are_set():
    async with _client(make_app(api_keys="unit-user-key-1")) as c:
        assert (await c.post("/tokenize", json={"prompt": "x"})).status_code == 401
        ok = await c.post("/tokenize", json={"prompt": "x"},
                          headers={"Authorization": "Bearer unit-user-key-1"})
        assert ok.status_code == 200
