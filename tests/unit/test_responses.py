"""POST /v1/responses against the fakes: the response object, the event stream (as
openai-python's typed parser reads it), alignment, translation onto the chat path, every
refused field, and aborts on disconnect."""

import asyncio
import json

import httpx
import openai
import pytest
from fakes import FakeEngine, make_app

BASE = {"model": "fake", "input": "say something good", "max_output_tokens": 8}


def events_of(text: str) -> list[dict]:
    """SSE events: each `event:` line must name the `type` of its `data:`."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" not in lines:
            continue
        data = json.loads(lines["data"])
        assert lines.get("event") == data["type"]
        out.append(data)
    return out


def sdk(app) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test/v1")
    return openai.AsyncOpenAI(api_key="unused", base_url="http://test/v1", http_client=http,
                              max_retries=0)


async def test_response_object_has_openai_shape(client):
    r = await client.post("/v1/responses", json={**BASE, "metadata": {"k": "v"}, "user": "u1"})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert body["model"] == "fake" and body["metadata"] == {"k": "v"} and body["user"] == "u1"
    (item,) = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["id"].startswith("msg_")
    (part,) = item["content"]
    assert part["type"] == "output_text" and part["annotations"] == []
    u = body["usage"]
    assert u["output_tokens"] == len(part["text"].split())
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    assert u["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    assert u["output_tokens_details"] == {"reasoning_tokens": 0}
    assert body["status"] in ("completed", "incomplete") and item["status"] == body["status"]
    assert body["alignment"] is None and body["store"] is False


async def test_cut_by_length_is_incomplete():
    app = make_app(FakeEngine(full_length=True))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as c:
        body = (await c.post("/v1/responses", json={**BASE, "max_output_tokens": 3})).json()
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] == 3 and body["output"][0]["status"] == "incomplete"


async def test_instructions_and_items_become_chat_messages(client, engine):
    req = {"model": "fake", "instructions": "be nice", "max_output_tokens": 4, "input": [
        {"role": "user", "content": "hi there"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "hello", "annotations": []}]},
        {"role": "user", "content": [{"type": "input_text", "text": "again"},
                                     {"type": "input_text", "text": " please"}]}]}
    r = await client.post("/v1/responses", json=req)
    assert r.status_code == 200, r.text
    prompt = engine.tokenizer.decode(engine.calls[-1][0]).split()
    assert prompt == ["<system>", "be", "nice", "<user>", "hi", "there", "<assistant>",
                      "hello", "<user>", "again", "please", "<assistant>"]
    assert r.json()["instructions"] == "be nice"


async def test_best_of_n_alignment_as_on_chat(client, engine):
    req = {**BASE, "alignment": {"strategy": "best_of_n", "n": 5, "return_candidates": True}}
    body = (await client.post("/v1/responses", json=req)).json()
    a = body["alignment"]
    assert a["strategy"] == "best_of_n" and a["n"] == 5 and len(a["candidates"]) == 5
    best = max(a["candidates"], key=lambda c: c["reward"])
    assert body["output"][0]["content"][0]["text"] == best["text"]
    assert engine.calls[-1][1] == 5  # one engine call drew the 5 candidates


async def test_stream_event_sequence(client):
    req = {**BASE, "stream": True, "alignment": {"strategy": "best_of_n", "n": 3}}
    r = await client.post("/v1/responses", json=req)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in r.text
    events = events_of(r.text)
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", kinds[-1]]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done = events[-1]["response"]
    assert done["output"][0]["content"][0]["text"] == text
    assert events[-4]["text"] == text
    assert done["usage"]["output_tokens"] == len(text.split())
    assert done["alignment"]["strategy"] == "best_of_n" and done["alignment"]["n"] == 3
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert {e["response"]["id"] for e in (events[0], events[-1])} == {done["id"]}


async def test_openai_sdk_reads_response_and_stream():
    app = make_app(FakeEngine(seed=3))
    client = sdk(app)
    resp = await client.responses.create(model="fake", input="say something", max_output_tokens=6,
                                         extra_body={"alignment": {"strategy": "best_of_n",
                                                                   "n": 4}})
    assert resp.output_text and resp.usage.output_tokens == len(resp.output_text.split())
    assert resp.model_extra["alignment"]["n"] == 4
    stream = await client.responses.create(model="fake", input="say something",
                                           max_output_tokens=6, stream=True)
    seen = [event async for event in stream]
    assert type(seen[0]).__name__ == "ResponseCreatedEvent"
    deltas = [e.delta for e in seen if type(e).__name__ == "ResponseTextDeltaEvent"]
    final = seen[-1].response
    assert final.output_text == "".join(deltas) and final.usage.total_tokens > 0


async def test_sdk_stream_helper_accumulates():
    client = sdk(make_app(FakeEngine(seed=1)))  # a seed whose answer ends before the limit
    async with client.responses.stream(model="fake", input="hi", max_output_tokens=40) as stream:
        texts = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert final.output_text == "".join(texts) and final.output[0].content[0].text


async def test_stream_cut_by_length_ends_incomplete():
    app = make_app(FakeEngine(full_length=True))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as c:
        r = await c.post("/v1/responses", json={**BASE, "max_output_tokens": 3, "stream": True})
    events = events_of(r.text)
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"]["output_tokens"] == 3
    assert events[-2]["item"]["status"] == "incomplete"


async def test_json_schema_reaches_the_engine(client, engine):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    req = {**BASE, "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}}
    r = await client.post("/v1/responses", json=req)
    assert r.status_code == 200, r.text
    assert engine.calls[-1][2].structured == ("json_schema", json.dumps(schema))
    assert r.json()["text"]["format"]["type"] == "json_schema"


async def test_explicit_nulls_mean_unset(client):
    req = {**BASE, **{k: None for k in ("instructions", "temperature", "top_p", "stream",
                                        "tools", "tool_choice", "previous_response_id",
                                        "reasoning", "include", "background", "metadata",
                                        "store", "text", "truncation", "alignment")}}
    r = await client.post("/v1/responses", json=req)
    assert r.status_code == 200, r.text


async def test_accepted_without_effect(client):
    req = {**BASE, "store": True, "tools": [], "tool_choice": "auto", "parallel_tool_calls": True,
           "truncation": "disabled", "reasoning": {"effort": "low", "summary": None}, "include": [],
           "background": False, "service_tier": "auto", "safety_identifier": "s",
           "prompt_cache_key": "k", "stream_options": {"include_obfuscation": False}}
    r = await client.post("/v1/responses", json=req)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("extra,param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"reasoning": {"summary": "auto"}}, "reasoning"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"truncation": "auto"}, "truncation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools to require
    ({"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": "x", "bogus": 1}]}, "input[0].bogus"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": []}, "input"),
    ({"max_output_tokens": 500}, "max_output_tokens"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"alignment": {"strategy": "best_of_n", "bogus": 1}}, "alignment.bogus"),
])
async def test_refused_by_name(client, engine, extra, param):
    r = await client.post("/v1/responses", json={**BASE, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert not engine.calls  # refused before any engine work
    if param == "max_output_tokens":
        assert "max_output_tokens" in err["message"] and "max_tokens" not in err["message"]


async def test_unknown_model_is_404(client):
    r = await client.post("/v1/responses", json={**BASE, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_disconnect_aborts_the_engine_work_and_frees_the_slot():
    engine = FakeEngine()
    engine.gate = asyncio.Event()  # hold every engine request open
    app = make_app(engine)
    gone = asyncio.Event()
    body = json.dumps({**BASE, "stream": True,
                       "alignment": {"strategy": "best_of_n", "n": 3}}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/responses", "raw_path": b"/v1/responses",
             "query_string": b"", "headers": [(b"content-type", b"application/json"),
                                              (b"content-length", str(len(body)).encode())],
             "http_version": "1.1", "scheme": "http", "server": ("test", 80),
             "client": ("test", 1), "root_path": "", "asgi": {"version": "3.0",
                                                              "spec_version": "2.4"}}
    call = asyncio.create_task(app(scope, receive, send))
    while engine.active == 0:
        await asyncio.sleep(0)
    gone.set()
    await asyncio.wait_for(call, 10)
    assert engine.cancelled >= 1 and engine.active == 0
    assert app.state.admission.active == 0
    streamed = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b"response.created" in streamed and b"response.completed" not in streamed


@pytest.mark.parametrize("stream", [False, True])
async def test_a_preset_chosen_by_model_name(stream):
    """Presets apply as on chat; the request's own alignment fields win within its strategy."""
    app = make_app(presets={"best-of-3": {"strategy": "best_of_n", "n": 3,
                                          "return_candidates": True}})
    req = {**BASE, "model": "best-of-3", "stream": stream, "alignment": {"n": 2}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as c:
        r = await c.post("/v1/responses", json=req)
    assert r.status_code == 200, r.text
    body = events_of(r.text)[-1]["response"] if stream else r.json()
    assert body["model"] == "best-of-3"
    a = body["alignment"]
    assert a["strategy"] == "best_of_n" and a["n"] == 2 and len(a["candidates"]) == 2
