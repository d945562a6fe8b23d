"""Tool calling (server/tools.py, runtime/tools.py) on the fakes: the schema every candidate is
generated under (vLLM's own builder), the chosen answer parsed into `tool_calls` with
finish_reason "tool_calls" (streamed too), best-of-n selecting among tool-call candidates, and
every bad input a 400 naming its field."""

import json

import httpx
import pytest
from fakes import FakeEngine, make_app, sse_events

from decoding.types import Sample

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
MSG = [{"role": "user", "content": "weather in Paris?"}]


class JsonEngine(FakeEngine):
    """A fake whose samples are the texts given, in turn (what a grammar would let through)."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__()
        self.texts = texts

    async def generate(self, prompt_ids, n, sampling):
        out = await super().generate(prompt_ids, n, sampling)
        return [Sample(s.token_ids, self.texts[(len(self.calls) - 1 + i) % len(self.texts)],
                       s.logprobs, "stop") for i, s in enumerate(out)]


def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://test")


async def _chat(app, **body):
    async with _client(app) as c:
        return await c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 16,
                                                          **body})


async def test_required_generates_under_vllms_schema_and_returns_tool_calls():
    engine = JsonEngine(['[{"name": "get_weather", "parameters": {"city": "Paris"}}]'])
    r = await _chat(make_app(engine), tools=[WEATHER, TIME], tool_choice="required",
                    parallel_tool_calls=False)
    assert r.status_code == 200, r.text
    schema = json.loads(engine.calls[-1][2].structured[1])
    assert schema["type"] == "array" and schema["maxItems"] == 1
    names = [s["properties"]["name"]["enum"] for s in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


async def test_a_named_function_is_generated_as_its_arguments():
    engine = JsonEngine(['{"city": "Oslo"}'])
    r = await _chat(make_app(engine), tools=[WEATHER, TIME],
                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(engine.calls[-1][2].structured[1]) == WEATHER["function"]["parameters"]
    call = r.json()["choices"][0]["message"]["tool_calls"][0]
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == (
        "get_weather", {"city": "Oslo"})


async def test_the_tools_reach_the_chat_template():
    engine = JsonEngine(['{"city": "Oslo"}'])
    await _chat(make_app(engine), tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert "{tools=" in engine.tokenizer.decode(engine.calls[-1][0])
    await _chat(make_app(engine), tools=[WEATHER], tool_choice="none")
    prompt = engine.tokenizer.decode(engine.calls[-1][0])
    assert "{tools=" not in prompt and engine.calls[-1][2].structured is None


async def test_best_of_n_selects_among_tool_call_candidates():
    texts = [f'[{{"name": "get_weather", "parameters": {{"city": "{c}"}}}}]'
             for c in ("a good day", "a bad day", "a good good day")]
    engine = JsonEngine(texts)
    r = await _chat(make_app(engine), tools=[WEATHER], tool_choice="required",
                    alignment={"strategy": "best_of_n", "n": 3, "return_candidates": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    cands = choice["alignment"]["candidates"]
    assert all(c["tool_calls"][0]["function"]["name"] == "get_weather" for c in cands)
    best = max(cands, key=lambda c: c["reward"])  # good_count: the reward the fakes serve
    args = json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])
    assert args == json.loads(best["tool_calls"][0]["function"]["arguments"])
    assert args == {"city": "a good good day"}  # the scorer saw each candidate's JSON text


async def test_a_streamed_tool_call_arrives_as_one_delta_with_tool_calls():
    engine = JsonEngine(['[{"name": "get_time", "parameters": {}}]'])
    async with _client(make_app(engine)) as c:
        r = await c.post("/v1/chat/completions", json={
            "messages": MSG, "max_tokens": 16, "stream": True, "tools": [WEATHER, TIME],
            "tool_choice": "required"})
    events = sse_events(r.text)
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    calls = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert len(calls) == 1 and calls[0][0]["index"] == 0
    assert calls[0][0]["function"]["name"] == "get_time"
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(d.get("content") for d in deltas)  # the JSON is not streamed as text


async def test_output_cut_by_max_tokens_stays_text():
    engine = JsonEngine(['[{"name": "get_wea'])
    r = await _chat(make_app(engine), tools=[WEATHER], tool_choice="required")
    choice = r.json()["choices"][0]
    assert choice["message"]["tool_calls"] == [] and choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == '[{"name": "get_wea'


async def test_a_tool_result_in_the_history_continues_the_chat():
    engine = JsonEngine(["It is sunny."])
    history = [*MSG, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    async with _client(make_app(engine)) as c:
        r = await c.post("/v1/chat/completions", json={"messages": history, "max_tokens": 8,
                                                       "tools": [WEATHER], "tool_choice": "none"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "It is sunny."
    assert "sunny, 21 C" in engine.tokenizer.decode(engine.calls[-1][0])


@pytest.mark.parametrize("body, param", [
    ({"tools": [WEATHER, {"type": "function", "function": {
        "name": "bad", "parameters": {"type": "not-a-type"}}}], "tool_choice": "required"},
     "tools[1].function.parameters"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools[1].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER]}, "tool_choice"),  # auto without a parser on this server
    ({"tools": [WEATHER], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [*MSG, {"role": "tool", "tool_call_id": "call_9", "content": "x"}],
      "tools": [WEATHER], "tool_choice": "none"}, "messages[1].tool_call_id"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}],
      "tool_choice": "required"}, "tools.0.function.name"),
])
async def test_bad_tool_input_is_a_400_naming_the_field(body, param):
    r = await _chat(make_app(JsonEngine(["{}"])), **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("strategy", [{"strategy": "blockwise_cd", "n": 2},
                                      {"strategy": "tokenwise_cd", "value": "good_count"}])
async def test_strategies_that_continue_answers_refuse_tools(strategy):
    r = await _chat(make_app(), tools=[WEATHER], tool_choice="required", alignment=strategy)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "tools" and strategy["strategy"] in err["message"]
    ok = await _chat(make_app(), tools=[WEATHER], tool_choice="none",
                     alignment={"strategy": "blockwise_cd", "n": 2})
    assert ok.status_code == 200, ok.text


async def test_auto_reads_the_models_own_syntax_through_the_servers_parser():
    engine = JsonEngine(['<call>get_time</call>', "plain words"])
    app = make_app(engine)

    def parse(text, tools):  # stands in for a vLLM parser (runtime/tools.py load_parser)
        assert [t["function"]["name"] for t in tools] == ["get_weather", "get_time"]
        if not text.startswith("<call>"):
            return text, []
        return None, [{"id": "call_x", "type": "function",
                       "function": {"name": text[6:-7], "arguments": "{}"}}]

    app.state.serving.resolver.parse_tools = parse
    r = await _chat(app, tools=[WEATHER, TIME])  # tool_choice omitted: auto
    assert engine.calls[-1][2].structured is None  # auto is not a grammar
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    r = await _chat(app, tools=[WEATHER, TIME], tool_choice="auto")
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "plain words", "tool_calls": []}
    assert choice["finish_reason"] == "stop"


def test_required_tool_calls_are_closed_objects():
    """vLLM's "required" schema leaves each call object open; a call is exactly name +
    parameters, or a small model writes extra keys until max_tokens and nothing parses."""
    from runtime.tools import tool_schema

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    schema = tool_schema([weather], "required", False)
    (branch,) = schema["items"]["anyOf"]
    assert branch["additionalProperties"] is False
    assert set(branch["properties"]) == {"name", "parameters"} and schema["maxItems"] == 1
