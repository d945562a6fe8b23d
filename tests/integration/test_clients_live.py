"""Chat frontends and SDK apps, used unchanged, get aligned answers: presets chosen by model name
through the real client libraries (openai, LangChain, LiteLLM, LlamaIndex), request shapes that
Open WebUI and LibreChat send, a long chat and a large max_tokens on the model's own context,
explicit nulls and assistant prefill — on a server with the model's context (8,192 tokens), the
default limits and the presets `make serve` ships; tool calls (required and named through
structured outputs, auto through vLLM's hermes parser)."""

from __future__ import annotations

import json
import os
import re

import httpx
import pytest
from live import ROOT, Server
from pydantic import BaseModel, Field

pytestmark = pytest.mark.integration

PRESETS = ROOT / "server" / "data" / "presets-embedded.yaml"
ASK = "Give me one tip for learning Python."


@pytest.fixture(scope="module")
def srv(launch_server, tmp_path_factory):
    with launch_server(tmp_path_factory.mktemp("clients") / "server.log",
                       ["--presets-file", str(PRESETS), "--tool-call-parser", "hermes"],
                       limits=()) as s:
        yield s


def best_of_n_requests(srv: Server) -> float:
    """Requests the server ran with strategy best_of_n (its Prometheus counter)."""
    text = httpx.get(f"{srv.base_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("alignserve:requests_total{")
               and 'strategy="best_of_n"' in line)


@pytest.fixture
def counts_best_of_n(srv):
    """Asserts the test ran its requests as best-of-n (a preset), whatever the client shows."""
    before = best_of_n_requests(srv)
    yield
    assert best_of_n_requests(srv) > before


def openai_client(srv):
    from openai import OpenAI

    return OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_models_lists_the_presets_with_their_alignment(srv):
    data = openai_client(srv).models.list().data
    ids = [m.id for m in data]
    assert ids[0] == "SmolLM2-135M-Instruct"
    assert {"best-of-8", "safe-best-of-8", "speculative-32", "blockwise-cd"} <= set(ids)
    bo8 = next(m for m in data if m.id == "best-of-8")
    assert bo8.model_extra["alignment"] == {"strategy": "best_of_n", "n": 8}
    assert bo8.model_extra["parent"] == "SmolLM2-135M-Instruct"
    assert bo8.model_extra["max_model_len"] == 8192


def test_openai_sdk_gets_the_presets_accounting(srv):
    r = openai_client(srv).chat.completions.create(
        model="safe-best-of-8", messages=[{"role": "user", "content": ASK}], max_tokens=12,
        seed=3)
    assert r.model == "safe-best-of-8" and r.choices[0].message.content.strip()
    info = r.choices[0].model_extra["alignment"]
    assert (info["strategy"], info["n"], info["cost_weight"]) == ("best_of_n", 8, 2.0)
    assert info["cost"] is not None and 0 < info["kl_bound"] <= 2.08 - 0.875 + 1e-9


def test_a_request_merges_its_alignment_over_the_preset(srv):
    r = openai_client(srv).chat.completions.create(
        model="best-of-8", messages=[{"role": "user", "content": ASK}], max_tokens=8,
        extra_body={"alignment": {"n": 2, "return_candidates": True}})
    info = r.choices[0].model_extra["alignment"]
    assert (info["strategy"], info["n"], len(info["candidates"])) == ("best_of_n", 2, 2)


def test_langchain_invoke_stream_batch_and_structured_output(srv, counts_best_of_n):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="best-of-8", base_url=f"{srv.base_url}/v1", api_key="unused",
                     max_tokens=12, max_retries=0, timeout=300)
    assert llm.invoke(ASK).content.strip()
    assert "".join(c.content for c in llm.stream(ASK)).strip()
    assert all(m.content.strip() for m in llm.batch([ASK, "Name a colour."]))

    class Tip(BaseModel):
        tip: str = Field(max_length=40)  # the grammar bounds it: the JSON closes in budget

    structured = ChatOpenAI(model="best-of-8", base_url=f"{srv.base_url}/v1", api_key="unused",
                            max_tokens=64, max_retries=0, timeout=300
                            ).with_structured_output(Tip, method="json_schema")
    assert isinstance(structured.invoke(ASK), Tip)


def test_litellm_completion_and_stream(srv, counts_best_of_n):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
    import litellm

    kw = {"model": "openai/best-of-8", "api_base": f"{srv.base_url}/v1", "api_key": "unused",
          "messages": [{"role": "user", "content": ASK}], "max_tokens": 12}
    assert litellm.completion(**kw).choices[0].message.content.strip()
    text = "".join(c.choices[0].delta.content or "" for c in litellm.completion(**kw, stream=True))
    assert text.strip()


def test_llama_index_chat_and_stream(srv, counts_best_of_n):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(model="best-of-8", api_base=f"{srv.base_url}/v1", api_key="unused",
                     is_chat_model=True, context_window=8192, max_tokens=12, max_retries=0)
    msgs = [ChatMessage(role="user", content=ASK)]
    assert llm.chat(msgs).message.content.strip()
    assert "".join(r.delta or "" for r in llm.stream_chat(msgs)).strip()


# What the frontends send by default (read from their sources; DESIGN-NOTES §3): Open WebUI
# streams with stream_options.include_usage forced on and copies a model's custom params into
# the body; LibreChat (through @langchain/openai) sends `user`, stream_options and its defaults.
OPEN_WEBUI = {"model": "best-of-8", "stream": True, "stream_options": {"include_usage": True},
              "messages": [{"role": "system", "content": "You are a helpful assistant."},
                           {"role": "user", "content": ASK}],
              "max_tokens": 12, "temperature": 0.8}
LIBRECHAT = {"model": "best-of-8", "stream": True, "stream_options": {"include_usage": True},
             "user": "6731f2c0e4b0a1b2c3d4e5f6", "temperature": 1, "top_p": 1,
             "presence_penalty": 0, "frequency_penalty": 0, "max_tokens": 12,
             "messages": [{"role": "user", "content": ASK}]}


@pytest.mark.parametrize("body", [OPEN_WEBUI, LIBRECHAT], ids=["open-webui", "librechat"])
def test_frontend_request_shapes_stream_an_aligned_answer(srv, body, counts_best_of_n):
    with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", json=body,
                      timeout=300) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] > 0
    text = "".join(c["delta"].get("content") or "" for e in events[:-2]
                   for c in json.loads(e)["choices"])
    assert text.strip()


def test_explicit_nulls_are_not_set(srv):
    body = {"model": "best-of-8", "messages": [{"role": "user", "content": ASK}],
            "max_tokens": 8, "n": None, "stream": None, "logprobs": None, "temperature": None,
            "top_p": None, "stop": None, "seed": None, "tools": None, "tool_choice": None,
            "response_format": None, "stream_options": None, "user": None}
    r = httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["alignment"]["strategy"] == "best_of_n"


def test_a_long_chat_and_a_large_max_tokens_fit_the_models_context(srv):
    words = " ".join(re.sub(r"\W", "", w) for w in (ASK * 52).split())  # ~370 tokens a turn
    history = [{"role": role, "content": f"{i}: {words}"}
               for i, role in enumerate(["user", "assistant"] * 4)]
    r = openai_client(srv).chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[*history, {"role": "user", "content": ASK}],
        max_tokens=2048, stop=["\n", "."], temperature=0)
    assert r.usage.prompt_tokens > 2900  # a 9-turn chat of ~3,000 tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_assistant_prefill_continues_the_answer(srv):
    r = httpx.post(f"{srv.base_url}/v1/chat/completions", timeout=300, json={
        "model": "best-of-8", "max_tokens": 8, "add_generation_prompt": False,
        "continue_final_message": True,
        "messages": [{"role": "user", "content": ASK},
                     {"role": "assistant", "content": "My tip: practise"}]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    # only the continuation is generated, returned and accounted for
    assert 0 < choice["alignment"]["generated_tokens"] <= 8 * 8
    assert not choice["message"]["content"].startswith("My tip")


# ---------------------------------------------------------------- tools

# An enum keeps every argument short: the grammar closes the JSON well inside max_tokens.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Oslo"]}},
        "required": ["city"], "additionalProperties": False}}}
RAIN = [{"role": "user", "content": "Will it rain in Paris today?"}]


def test_openai_required_tool_call_on_a_best_of_n_preset(srv):
    r = openai_client(srv).chat.completions.create(
        model="best-of-8", messages=RAIN, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, max_tokens=64,
        extra_body={"alignment": {"n": 3, "return_candidates": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "London", "Oslo")
    cands = choice.model_extra["alignment"]["candidates"]
    assert len(cands) == 3 and all(c["tool_calls"][0]["function"]["name"] == "get_weather"
                                   for c in cands)


def test_openai_named_tool_call_streams_as_a_tool_call_delta(srv):
    stream = openai_client(srv).chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=RAIN, tools=[WEATHER], max_tokens=64,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True)
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "London", "Oslo")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_langchain_bind_tools(srv):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="best-of-8", base_url=f"{srv.base_url}/v1", api_key="unused",
                     max_tokens=64, max_retries=0, timeout=300)
    forced = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke(RAIN[0]["content"])
    assert forced.tool_calls[0]["name"] == "get_weather"
    assert forced.tool_calls[0]["args"]["city"] in ("Paris", "London", "Oslo")
    required = llm.bind_tools([WEATHER], tool_choice="required").invoke(RAIN[0]["content"])
    assert required.tool_calls and required.tool_calls[0]["name"] == "get_weather"
    # auto (bind_tools' default) on vLLM's hermes parser: the model may answer in text
    auto = llm.bind_tools([WEATHER]).invoke(RAIN[0]["content"])
    assert auto.tool_calls or auto.content.strip()


def test_a_tool_result_continues_the_chat(srv):
    history = [*RAIN, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Rain all day, 12 C."}]
    r = openai_client(srv).chat.completions.create(
        model="best-of-8", messages=history, tools=[WEATHER], tool_choice="none",
        max_tokens=16)
    assert r.choices[0].message.content.strip() and not r.choices[0].message.tool_calls
