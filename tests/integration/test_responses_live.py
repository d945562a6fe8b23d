"""/v1/responses on the real engine through the real clients: openai-python's
`responses.create` (streamed and not, typed events), alignment through `extra_body`, LangChain
`ChatOpenAI(use_responses_api=True)` (text and `bind_tools`), function tools (required and named
through structured outputs; a tool result in the history), and a disconnect mid-stream. Cheap:
the session server, max_output_tokens ≤ 24 except where length is the point or a tool call's
JSON must close."""

from __future__ import annotations

import json

import httpx
import pytest
from live import wait_until

pytestmark = pytest.mark.integration

ASK = "Write one sentence about the sea."
# An enum keeps every argument short: the grammar closes the JSON well inside the token limit.
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "enum": ["Paris", "London", "Oslo"]}},
               "required": ["city"], "additionalProperties": False}}
RAIN = "Will it rain in Paris today?"
CITIES = ("Paris", "London", "Oslo")


def test_create_answers_like_chat(client, model_name):
    r = client.responses.create(model=model_name, instructions="Be brief.", input=ASK,
                                max_output_tokens=16, temperature=1.0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == model_name
    assert r.output_text.strip() and r.output[0].content[0].type == "output_text"
    assert r.status in ("completed", "incomplete")
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert 0 < r.usage.output_tokens <= 16
    # the same conversation through chat: the same prompt, token for token
    chat = client.chat.completions.create(
        model=model_name, max_tokens=1, messages=[{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": ASK}])
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_items_history_and_length_cut(client, model_name):
    r = client.responses.create(model=model_name, max_output_tokens=3, temperature=1.0, input=[
        {"role": "user", "content": "Name a colour."},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Blue.", "annotations": []}]},
        {"role": "user", "content": [{"type": "input_text", "text": ASK * 3}]}])
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"


def test_stream_is_the_responses_event_sequence(client, model_name):
    stream = client.responses.create(model=model_name, input=ASK, max_output_tokens=16,
                                     temperature=1.0, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1  # plain sampling streams as it generates
    final = events[-1].response
    assert final.output_text == "".join(deltas) == events[-4].text
    assert final.usage.output_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
def test_best_of_n_through_extra_body(client, model_name, stream):
    extra = {"alignment": {"strategy": "best_of_n", "n": 3, "return_candidates": True}}
    kw = {"model": model_name, "input": ASK, "max_output_tokens": 12, "temperature": 1.0,
          "extra_body": extra}
    if stream:  # the last event's response: completed, or incomplete when cut by length
        r = list(client.responses.create(**kw, stream=True))[-1].response
    else:
        r = client.responses.create(**kw)
    a = r.model_extra["alignment"]
    assert a["strategy"] == "best_of_n" and a["n"] == 3 and len(a["candidates"]) == 3
    best = max(a["candidates"], key=lambda c: c["reward"])
    assert r.output_text == best["text"] and a["reward"] == best["reward"]
    assert 0 <= a["kl_estimate"] <= a["kl_bound"] + 1e-9


def test_refusals_name_the_field(server, model_name):
    for extra, param in (({"previous_response_id": "resp_x"}, "previous_response_id"),
                         ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
                         ({"tools": [WEATHER]}, "tool_choice")):  # auto: no parser here
        r = httpx.post(f"{server.base_url}/v1/responses",
                       json={"model": model_name, "input": ASK, **extra}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_langchain_use_responses_api(server, model_name):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", model=model_name,
                     use_responses_api=True, max_tokens=12, temperature=1.0, max_retries=0,
                     extra_body={"alignment": {"strategy": "best_of_n", "n": 2}})
    msg = llm.invoke([("system", "Be brief."), ("human", ASK)])
    assert msg.text.strip() and msg.response_metadata["id"].startswith("resp_")
    assert 0 < msg.usage_metadata["output_tokens"] <= 12
    chunks = list(llm.stream(ASK))
    text = "".join(c.text for c in chunks)
    assert text.strip()
    assert sum((c.usage_metadata or {}).get("output_tokens", 0) for c in chunks) > 0


def test_disconnect_mid_stream_aborts_engine_work(server, model_name):
    before = server.metric("alignserve:engine_aborts_total")
    body = {"model": model_name, "input": "Tell a very long story about dragons.",
            "max_output_tokens": 600, "temperature": 1.0, "stream": True,
            "alignment": {"strategy": "best_of_n", "n": 4}}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{server.base_url}/v1/responses", json=body):
            assert wait_until(lambda: server.metric("alignserve:engine_requests_unfinished") > 0,
                              30), "engine never started"
    assert wait_until(lambda: server.metric("alignserve:engine_requests_unfinished") == 0, 5)
    assert wait_until(lambda: server.metric("alignserve:engine_aborts_total") > before, 5)


def test_required_function_tool_best_of_n(client, model_name):
    r = client.responses.create(
        model=model_name, input=RAIN, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, max_output_tokens=64, temperature=1.0,
        extra_body={"alignment": {"strategy": "best_of_n", "n": 3, "return_candidates": True}})
    assert r.status == "completed"
    (call,) = r.output  # the answer is the call: no message item
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert json.loads(call.arguments)["city"] in CITIES
    cands = r.model_extra["alignment"]["candidates"]
    assert len(cands) == 3 and all(c["tool_calls"][0]["function"]["name"] == "get_weather"
                                   for c in cands)
    best = max(cands, key=lambda c: c["reward"])
    assert json.loads(best["tool_calls"][0]["function"]["arguments"]) == json.loads(
        call.arguments)


def test_named_function_streams_function_call_events(client, model_name):
    with client.responses.stream(model=model_name, input=RAIN, tools=[WEATHER],
                                 tool_choice={"type": "function", "name": "get_weather"},
                                 max_output_tokens=64) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[2:] == ["response.output_item.added", "response.function_call_arguments.delta",
                         "response.function_call_arguments.done", "response.output_item.done",
                         "response.completed"]
    (call,) = final.output
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in CITIES


def test_a_function_result_in_the_input_continues(client, model_name):
    r = client.responses.create(model=model_name, max_output_tokens=16, tools=[WEATHER],
                                tool_choice="none", input=[
        {"role": "user", "content": RAIN},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Rain all day, 12 C."}])
    assert r.output_text.strip() and [o.type for o in r.output] == ["message"]


def test_langchain_bind_tools_on_the_responses_api(server, model_name):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", model=model_name,
                     use_responses_api=True, max_tokens=64, max_retries=0, timeout=300,
                     extra_body={"alignment": {"strategy": "best_of_n", "n": 2}})
    chat_tool = {"type": "function", "function": {k: WEATHER[k] for k in (
        "name", "description", "parameters")}}
    msg = llm.bind_tools([chat_tool], tool_choice="required").invoke(RAIN)
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert msg.tool_calls[0]["args"]["city"] in CITIES
