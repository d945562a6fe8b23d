"""Function tools on POST /v1/responses against the fakes: Responses tools and tool_choice
translated onto chat's tool machinery (vLLM's schema for required/named, the parser for auto),
each parsed call an output item `function_call` (as openai-python's types read it), history
items, the streamed event sequence through openai-python's typed stream helper, best-of-n among
tool-call candidates, and every bad input a 400 naming the Responses field."""

import json

import httpx
import openai
import pytest
from fakes import FakeEngine, make_app
from openai.types.responses import Response, ResponseFunctionToolCall

from decoding.types import Sample

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}, "strict": True}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}
BASE = {"model": "fake", "input": "weather in Paris?", "max_output_tokens": 16}
CALL = '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'


class JsonEngine(FakeEngine):
    """A fake whose samples are the texts given, in turn (what a grammar would let through)."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__()
        self.texts = texts
        self.messages: list[list[dict]] = []  # what the chat template was given, per request
        self.variables: list[dict] = []  # and its template variables
        template = self.tokenizer.apply_chat_template

        def recording(messages, **kw):
            self.messages.append(messages)
            self.variables.append(kw)
            return template(messages, **kw)

        self.tokenizer.apply_chat_template = recording

    async def generate(self, prompt_ids, n, sampling):
        out = await super().generate(prompt_ids, n, sampling)
        return [Sample(s.token_ids, self.texts[(len(self.calls) - 1 + i) % len(self.texts)],
                       s.logprobs, "stop") for i, s in enumerate(out)]


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://test")


async def _post(app, **body) -> httpx.Response:
    async with _client(app) as c:
        return await c.post("/v1/responses", json={**BASE, **body})


def sdk(app) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test/v1")
    return openai.AsyncOpenAI(api_key="unused", base_url="http://test/v1", http_client=http,
                              max_retries=0)


async def test_required_is_vllms_schema_and_answers_function_call_items():
    engine = JsonEngine([CALL])
    r = await _post(make_app(engine), tools=[WEATHER, TIME], tool_choice="required",
                    parallel_tool_calls=False)
    assert r.status_code == 200, r.text
    schema = json.loads(engine.calls[-1][2].structured[1])  # chat's (vLLM's) tool schema
    assert schema["type"] == "array" and schema["maxItems"] == 1
    assert [s["properties"]["name"]["enum"] for s in schema["items"]["anyOf"]] == [
        ["get_weather"], ["get_time"]]
    body = r.json()
    (item,) = body["output"]  # no text: no message item
    assert set(item) == {"id", "type", "call_id", "name", "arguments", "status"}
    assert item["type"] == "function_call" and item["id"].startswith("fc_")
    assert item["call_id"].startswith("call_") and item["status"] == "completed"
    assert (item["name"], json.loads(item["arguments"])) == ("get_weather", {"city": "Paris"})
    assert body["status"] == "completed"
    typed = Response.model_validate(body)  # openai-python's own types read it
    assert isinstance(typed.output[0], ResponseFunctionToolCall) and typed.output_text == ""
    assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False
    assert [t["name"] for t in body["tools"]] == ["get_weather", "get_time"]
    assert body["tools"][1] == {"type": "function", "name": "get_time", "description": None,
                                "parameters": {"type": "object"}, "strict": None}


async def test_parallel_calls_are_one_item_each():
    engine = JsonEngine(['[{"name": "get_weather", "parameters": {"city": "Oslo"}}, '
                         '{"name": "get_time", "parameters": {}}]'])
    r = await _post(make_app(engine), tools=[WEATHER, TIME], tool_choice="required")
    assert "maxItems" not in json.loads(engine.calls[-1][2].structured[1])
    items = r.json()["output"]
    assert [i["name"] for i in items] == ["get_weather", "get_time"]
    assert len({i["id"] for i in items}) == len({i["call_id"] for i in items}) == 2


async def test_a_named_function_is_generated_as_its_arguments():
    engine = JsonEngine(['{"city": "Oslo"}'])
    r = await _post(make_app(engine), tools=[WEATHER, TIME],
                    tool_choice={"type": "function", "name": "get_weather"})
    assert r.status_code == 200, r.text
    assert json.loads(engine.calls[-1][2].structured[1]) == WEATHER["parameters"]
    (item,) = r.json()["output"]
    assert (item["name"], json.loads(item["arguments"])) == ("get_weather", {"city": "Oslo"})
    assert r.json()["tool_choice"] == {"type": "function", "name": "get_weather"}
    # the tools reach the chat template in chat's shape, as vLLM passes them
    fn = {k: WEATHER[k] for k in ("name", "description", "parameters", "strict")}
    assert engine.variables[-1]["tools"][0] == {"type": "function", "function": fn}


async def test_tool_choice_none_and_no_tools_are_plain_text():
    engine = JsonEngine(["It is sunny."])
    r = await _post(make_app(engine), tools=[WEATHER], tool_choice="none")
    assert engine.calls[-1][2].structured is None
    (item,) = r.json()["output"]
    assert item["type"] == "message" and item["content"][0]["text"] == "It is sunny."


async def test_auto_needs_the_servers_parser_and_reads_text_and_calls_with_it():
    engine = JsonEngine(["Let me look. <call>get_time</call>"])
    app = make_app(engine)
    r = await _post(app, tools=[WEATHER, TIME])  # tool_choice omitted: auto
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--tool-call-parser" in r.json()["error"]["message"] and not engine.calls

    def parse(text, tools):  # stands in for a vLLM parser (runtime/tools.py load_parser)
        head, _, call = text.partition(" <call>")
        return head, [{"id": "call_x", "type": "function",
                       "function": {"name": call[:-len("</call>")], "arguments": "{}"}}]

    app.state.serving.resolver.parse_tools = parse
    r = await _post(app, tools=[WEATHER, TIME], tool_choice="auto")
    assert engine.calls[-1][2].structured is None  # auto is not a grammar
    message, call = r.json()["output"]
    assert message["type"] == "message" and message["content"][0]["text"] == "Let me look."
    assert (call["type"], call["name"], call["call_id"]) == ("function_call", "get_time",
                                                             "call_x")


async def test_output_cut_short_stays_a_message():
    engine = JsonEngine(['[{"name": "get_wea'])
    r = await _post(make_app(engine), tools=[WEATHER], tool_choice="required")
    (item,) = r.json()["output"]
    assert item["type"] == "message" and item["content"][0]["text"] == '[{"name": "get_wea'


async def test_history_items_become_tool_calls_and_tool_messages():
    engine = JsonEngine(["It is sunny in Paris and it is noon."])
    history = [
        {"role": "user", "content": "weather and time in Paris?"},
        {"type": "message", "role": "assistant", "content": "Checking."},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Paris"}', "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "12:00"}]}]
    r = await _post(make_app(engine), instructions="be brief", input=history,
                    tools=[WEATHER, TIME], tool_choice="none")
    assert r.status_code == 200, r.text
    system, user, assistant, *tool = engine.messages[-1]
    assert (system["role"], user["role"]) == ("system", "user")
    assert assistant["content"] == "Checking."  # the calls join the answer's text
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"])
            for c in assistant["tool_calls"]] == [("call_1", "get_weather", {"city": "Paris"}),
                                                  ("call_2", "get_time", {})]
    assert tool == [{"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"},
                    {"role": "tool", "content": "12:00", "tool_call_id": "call_2"}]


async def test_a_result_answering_no_call_names_its_input_item():
    engine = JsonEngine(["x"])
    history = [{"role": "user", "content": "hi"},
               {"type": "function_call", "call_id": "call_1", "name": "get_time",
                "arguments": "{}"},
               {"type": "function_call_output", "call_id": "call_9", "output": "x"}]
    r = await _post(make_app(engine), instructions="be brief", input=history)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "input[2].call_id"  # not messages[3].tool_call_id
    assert "call_9" in err["message"] and "function_call_output item" in err["message"]
    assert not engine.calls


async def test_openai_sdk_stream_helper_reads_the_function_call_events():
    engine = JsonEngine(['[{"name": "get_time", "parameters": {}}]'])
    client = sdk(make_app(engine))
    async with client.responses.stream(model="fake", input="time?", max_output_tokens=16,
                                       tools=[WEATHER, TIME], tool_choice="required") as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done",
                     "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added, delta, done, item_done = events[2:6]
    assert added.item.type == "function_call" and added.item.arguments == ""
    assert added.item.status == "in_progress" and added.output_index == 0
    assert delta.delta == done.arguments == "{}" and delta.snapshot == "{}"  # the helper's
    assert done.name == "get_time" and done.item_id == added.item.id == item_done.item.id
    assert item_done.item.status == "completed"
    (call,) = final.output
    assert isinstance(call, ResponseFunctionToolCall) and call.name == "get_time"
    assert call.call_id == item_done.item.call_id and call.arguments == "{}"
    assert final.status == "completed" and final.usage.output_tokens > 0


async def test_a_streamed_answer_with_text_and_calls_closes_the_message_first():
    engine = JsonEngine(["Let me look. <call>get_time</call>"])
    app = make_app(engine)
    app.state.serving.resolver.parse_tools = lambda text, tools: (
        "Let me look.", [{"id": "call_x", "type": "function",
                          "function": {"name": "get_time", "arguments": "{}"}}])
    client = sdk(app)
    async with client.responses.stream(model="fake", input="time?", max_output_tokens=16,
                                       tools=[TIME], tool_choice="auto") as stream:
        kinds = [(e.type, getattr(e, "output_index", None)) async for e in stream]
        final = await stream.get_final_response()
    assert kinds[2:-1] == [
        ("response.output_item.added", 0), ("response.content_part.added", 0),
        ("response.output_text.delta", 0), ("response.output_text.done", 0),
        ("response.content_part.done", 0), ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.done", 1), ("response.output_item.done", 1)]
    assert [o.type for o in final.output] == ["message", "function_call"]
    assert final.output_text == "Let me look."


@pytest.mark.parametrize("stream", [False, True])
async def test_best_of_n_selects_among_tool_call_candidates(stream):
    texts = [f'[{{"name": "get_weather", "parameters": {{"city": "{c}"}}}}]'
             for c in ("a good day", "a bad day", "a good good day")]
    r = await _post(make_app(JsonEngine(texts)), tools=[WEATHER], tool_choice="required",
                    stream=stream,
                    alignment={"strategy": "best_of_n", "n": 3, "return_candidates": True})
    assert r.status_code == 200, r.text
    if stream:
        last = [line for line in r.text.splitlines() if line.startswith("data: ")][-1]
        body = json.loads(last[6:])["response"]
    else:
        body = r.json()
    cands = body["alignment"]["candidates"]
    assert all(c["tool_calls"][0]["function"]["name"] == "get_weather" for c in cands)
    best = max(cands, key=lambda c: c["reward"])  # good_count: the reward the fakes serve
    (item,) = body["output"]
    assert json.loads(item["arguments"]) == {"city": "a good good day"} == json.loads(
        best["tool_calls"][0]["function"]["arguments"])


async def test_a_preset_applies_to_tool_requests():
    app = make_app(JsonEngine([CALL]), presets={"best-of-2": {"strategy": "best_of_n", "n": 2}})
    r = await _post(app, model="best-of-2", tools=[WEATHER], tool_choice="required")
    body = r.json()
    assert body["model"] == "best-of-2" and body["alignment"]["n"] == 2
    assert body["output"][0]["name"] == "get_weather"


BAD_SCHEMA = {**TIME, "name": "bad", "parameters": {"type": "not-a-type"}}


@pytest.mark.parametrize("body, param", [
    ({"tools": [WEATHER, {"type": "web_search_preview"}]}, "tools[1].type"),
    ({"tools": [{"type": "custom", "name": "x"}]}, "tools[0].type"),
    ({"tools": [WEATHER, BAD_SCHEMA], "tool_choice": "required"}, "tools[1].parameters"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools[1].name"),
    ({"tools": [{**TIME, "name": "has space"}], "tool_choice": "required"}, "tools[0].name"),
    ({"tools": [{**TIME, "function": {}}], "tool_choice": "required"}, "tools[0].function"),
    ({"tools": [{**TIME, "defer_loading": True}]}, "tools[0].defer_loading"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice.name"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "mode": "auto",
                                          "tools": []}}, "tool_choice.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice.name"),
    ({"tool_choice": {"type": "function", "name": "get_time"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "alignment": {"strategy": "blockwise_cd", "n": 2}}, "tools"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
     "input[0].arguments"),
    ({"input": [{"role": "user", "content": "hi"},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c",
                 "output": [{"type": "input_image", "image_url": "u"}]}]},
     "input[2].output[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
     "input[0].call_id"),
])
async def test_bad_tool_input_is_a_400_naming_the_responses_field(body, param):
    engine = JsonEngine(["{}"])
    r = await _post(make_app(engine), **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert "function." not in err["param"] and "messages" not in err["message"]
    assert not engine.calls  # refused before any engine work


async def test_langchain_bind_tools_on_the_responses_api():
    from langchain_openai import ChatOpenAI

    engine = JsonEngine(['{"city": "Oslo"}'])
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(engine)),
                             base_url="http://test/v1")
    llm = ChatOpenAI(base_url="http://test/v1", api_key="unused", model="fake", max_tokens=16,
                     use_responses_api=True, max_retries=0, http_async_client=http)
    chat_tool = {"type": "function", "function": {k: WEATHER[k] for k in (
        "name", "description", "parameters")}}
    msg = await llm.bind_tools([chat_tool], tool_choice="get_weather").ainvoke("weather?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather",
                                                                 {"city": "Oslo"})]
    assert msg.tool_calls[0]["id"].startswith("call_")
    # the result goes back as a ToolMessage: LangChain sends function_call(_output) items
    from langchain_core.messages import HumanMessage, ToolMessage

    engine.texts = ["It is sunny."]
    answer = await llm.bind_tools([chat_tool], tool_choice="none").ainvoke([
        HumanMessage("weather?"), msg, ToolMessage("sunny", tool_call_id=msg.tool_calls[0]["id"])])
    assert answer.text == "It is sunny." and not answer.tool_calls
    assert [m["role"] for m in engine.messages[-1]] == ["user", "assistant", "tool"]


async def test_the_sdks_own_output_items_go_back_as_input():
    engine = JsonEngine([CALL, "It rains."])
    client = sdk(make_app(engine))
    r = await client.responses.create(model="fake", input="rain?", tools=[WEATHER],
                                      tool_choice="required", max_output_tokens=16)
    call = r.output[0]
    again = await client.responses.create(model="fake", tools=[WEATHER], tool_choice="none",
                                          max_output_tokens=16, input=[
        {"role": "user", "content": "rain?"}, call,
        {"type": "function_call_output", "call_id": call.call_id, "output": "Rain, 12 C."}])
    assert again.output_text == "It rains."
    assert engine.messages[-1][1]["tool_calls"][0]["id"] == call.call_id
