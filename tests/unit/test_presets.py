"""Presets (server/presets.py) and the OpenAI fields as clients send them: presets chosen by
model name and merged with a request's own alignment, /v1/models, start-up errors in one line,
explicit nulls, fields refused by name, limits from the model's context, assistant prefill and
chat-template variables (all on the fakes)."""

import json

import httpx
import pytest
from fakes import FakeEngine, make_app, sse_events

from cli.main import main as cli_main
from cli.serve import settings_from_args
from runtime.settings import ConfigError
from server.presets import PresetBook, apply, parse_preset, parse_preset_flags
from server.protocol import ChatCompletionRequest
from server.settings import Settings

MSG = [{"role": "user", "content": "say something good"}]
BO3 = {"strategy": "best_of_n", "n": 3, "return_candidates": True}
PRESETS = {"best-of-3": BO3,
           "safe": {"alignment": {"strategy": "best_of_n", "n": 2, "cost": "bad_count"},
                    "description": "best-of-2 with the bad-word cost"}}


def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://test")


async def _post(app, body, path="/v1/chat/completions"):
    async with _client(app) as c:
        return await c.post(path, json=body)


# ---------------------------------------------------------------- parsing and merging


def test_a_preset_spec_is_an_alignment_object_or_a_wrapped_one():
    assert parse_preset("a", BO3).strategy == "best_of_n"
    p = parse_preset("s", PRESETS["safe"])
    assert (p.strategy, p.alignment["cost"], p.description) == ("best_of_n", "bad_count",
                                                                 "best-of-2 with the bad-word cost")


@pytest.mark.parametrize("spec, field", [
    ({"strategy": "best_of_nn"}, "alignment.strategy"),
    ({"strategy": "best_of_n", "n": 0}, "alignment.n"),
    ({"strategy": "best_of_n", "alpha": 0.5}, "alignment.alpha"),
    ({"strategy": "best_of_n", "cost_weight": 1e999}, "alignment.cost_weight"),
    ({"alignment": BO3, "adapterr": "x"}, "adapterr"),
    ([1, 2], "spec"),
])
def test_a_bad_preset_names_itself_and_the_field(spec, field):
    with pytest.raises(ConfigError) as exc:
        parse_preset("mine", spec)
    assert exc.value.setting == "presets"
    assert exc.value.message.startswith(f"preset 'mine': {field}:")


def test_request_fields_win_over_the_presets_within_one_strategy():
    preset = parse_preset("p", BO3)
    req = ChatCompletionRequest(messages=MSG, alignment={"n": 5})  # no strategy: merge
    merged = apply(preset, req.alignment)
    assert (merged.strategy, merged.n, merged.return_candidates) == ("best_of_n", 5, True)
    same = ChatCompletionRequest(messages=MSG, alignment={"strategy": "best_of_n", "n": 7})
    assert apply(preset, same.alignment).n == 7
    other = ChatCompletionRequest(messages=MSG, alignment={"strategy": "soft_best_of_n"})
    replaced = apply(preset, other.alignment)  # another strategy replaces the preset's object
    assert (replaced.strategy, replaced.n, replaced.return_candidates) == ("soft_best_of_n", 4,
                                                                          False)
    none = ChatCompletionRequest(messages=MSG, alignment={"strategy": "none"})
    assert apply(preset, none.alignment).strategy == "none"


def test_preset_flags_keep_commas_in_their_json():
    flags = ['a={"strategy": "best_of_n", "n": 2, "reward": "x"}', "b={}"]
    assert parse_preset_flags(flags) == {"a": {"strategy": "best_of_n", "n": 2, "reward": "x"},
                                         "b": {}}
    with pytest.raises(ConfigError):
        parse_preset_flags(["a={not json"])


def test_presets_come_from_a_yaml_file_and_flags_win(tmp_path):
    f = tmp_path / "presets.yaml"
    f.write_text("best-of-3:\n  strategy: best_of_n\n  n: 3\nother:\n  strategy: none\n")
    s = Settings(presets_file=f, presets={"best-of-3": {"strategy": "best_of_n", "n": 9}})
    assert s.preset_specs() == {"best-of-3": {"strategy": "best_of_n", "n": 9},
                                "other": {"strategy": "none"}}


def test_a_bad_preset_stops_the_cli_with_one_line(capsys):
    rc = cli_main(["serve", "--preset", 'x={"strategy": "best_of_n", "n": -1}'])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "preset 'x': alignment.n" in err and "Traceback" not in err
    rc = cli_main(["serve", "--default-preset", "nope"])
    assert rc == 2 and "default_preset" in capsys.readouterr().err


def test_preset_flags_reach_the_settings():
    import argparse
    ns = argparse.Namespace(presets=['p={"strategy": "best_of_n", "n": 2}'])
    assert settings_from_args(ns).presets == {"p": {"strategy": "best_of_n", "n": 2}}


async def test_start_up_check_names_an_unknown_scorer():
    app = make_app(presets={"bad": {"strategy": "best_of_n", "reward": "no_such"}})
    with pytest.raises(ConfigError) as exc:
        await app.state.serving.resolver.presets.check(app.state.runtime)
    assert exc.value.message.startswith("preset 'bad': alignment.reward:")


def test_a_preset_may_not_shadow_the_base_model():
    with pytest.raises(ConfigError):
        PresetBook.from_specs({"fake": BO3}, None, "fake")


# ---------------------------------------------------------------- through the API


async def test_models_lists_the_base_model_and_every_preset():
    app = make_app(presets=PRESETS)
    async with _client(app) as c:
        data = (await c.get("/v1/models")).json()["data"]
    ids = [m["id"] for m in data]
    assert ids == ["fake", "best-of-3", "safe"]
    by_id = {m["id"]: m for m in data}
    assert by_id["fake"]["root"] == "fake" and "parent" not in by_id["fake"]
    assert by_id["best-of-3"]["parent"] == "fake" and by_id["best-of-3"]["alignment"] == BO3
    assert by_id["safe"]["description"] == "best-of-2 with the bad-word cost"


async def test_a_request_for_a_preset_runs_its_alignment():
    engine = FakeEngine()
    app = make_app(engine, presets=PRESETS)
    r = await _post(app, {"model": "best-of-3", "messages": MSG, "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "best-of-3"  # the id the client asked for, as vLLM echoes it
    info = body["choices"][0]["alignment"]
    assert (info["strategy"], info["n"], len(info["candidates"])) == ("best_of_n", 3, 3)
    r = await _post(app, {"model": "safe", "messages": MSG, "max_tokens": 4})
    assert r.json()["choices"][0]["alignment"]["cost"] is not None  # the preset's cost ran


async def test_a_requests_own_alignment_merges_over_the_preset():
    app = make_app(presets=PRESETS)
    r = await _post(app, {"model": "best-of-3", "messages": MSG, "max_tokens": 4,
                          "alignment": {"n": 5}})
    info = r.json()["choices"][0]["alignment"]
    assert (info["strategy"], info["n"], len(info["candidates"])) == ("best_of_n", 5, 5)
    r = await _post(app, {"model": "best-of-3", "messages": MSG, "max_tokens": 4,
                          "alignment": {"strategy": "none"}})
    assert r.json()["choices"][0]["alignment"]["strategy"] == "none"  # replaced: plain


async def test_the_default_preset_applies_only_without_alignment():
    app = make_app(presets=PRESETS, default_preset="best-of-3")
    r = await _post(app, {"messages": MSG, "max_tokens": 4})
    assert r.json()["choices"][0]["alignment"]["n"] == 3
    r = await _post(app, {"model": "fake", "messages": MSG, "max_tokens": 4,
                          "alignment": {"strategy": "best_of_n", "n": 2}})
    assert r.json()["choices"][0]["alignment"]["n"] == 2


async def test_the_preset_labels_the_metrics():
    app = make_app(presets=PRESETS)
    await _post(app, {"model": "best-of-3", "messages": MSG, "max_tokens": 4})
    text = app.state.registry.get_sample_value
    assert text("alignserve:time_to_first_token_seconds_count",
                {"strategy": "best_of_n", "model": "best-of-3", "policy": "base"}) == 1


async def test_an_unknown_model_is_a_404_model_not_found():
    r = await _post(make_app(presets=PRESETS), {"model": "gpt-4o", "messages": MSG})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"


# ---------------------------------------------------------------- fields as clients send them


async def test_explicit_nulls_mean_not_set():
    nulls = {k: None for k in ("n", "stream", "logprobs", "temperature", "top_p", "stop",
                               "max_tokens", "seed", "stream_options", "response_format",
                               "presence_penalty", "tools", "tool_choice", "user", "top_k",
                               "min_tokens", "ignore_eos", "max_completion_tokens")}
    r = await _post(make_app(), {"messages": MSG, **nulls,
                                 "alignment": {"strategy": None, "n": None}})
    assert r.status_code == 200, r.text
    async with _client(make_app()) as c:
        r = await c.post("/v1/completions", json={"prompt": "hi", "echo": None, "n": None,
                                                  "logprobs": None, "suffix": None})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field, value", [
    ("audio", {"voice": "alloy", "format": "wav"}), ("prediction", {"type": "content",
                                                                   "content": "x"}),
    ("web_search_options", {}), ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("verbosity", "low"),
])
async def test_fields_this_server_cannot_honour_are_refused_by_name(field, value):
    r = await _post(make_app(), {"messages": MSG, field: value})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == field and err["code"] == "unsupported_field"
    assert err["message"].startswith(f"{field}: ") and "Extra inputs" not in err["message"]


@pytest.mark.parametrize("body, param", [
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"stream_options": {"include_usage": True, "bogus": 1}}, "stream_options.bogus"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {},
                                                                 "extra": 1}}},
     "response_format.json_schema.extra"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]},
     "messages.0.content"),
])
async def test_unknown_keys_in_nested_objects_are_refused(body, param):
    r = await _post(make_app(), {"messages": MSG, **body})
    assert r.status_code == 400
    assert r.json()["error"]["param"].startswith(param)


async def test_image_parts_are_refused_with_why():
    r = await _post(make_app(), {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    assert r.status_code == 400 and "reads text" in r.json()["error"]["message"]


async def test_text_only_modalities_are_accepted():
    r = await _post(make_app(), {"messages": MSG, "max_tokens": 4, "modalities": ["text"]})
    assert r.status_code == 200


async def test_a_lone_surrogate_is_a_400_naming_the_field():
    raw = '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 4}'
    async with _client(make_app()) as c:
        r = await c.post("/v1/chat/completions", content=raw,
                         headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages.0.content"


@pytest.mark.parametrize("alignment", [{"strategy": "best_of_n", "cost_weight": 1e999},
                                       {"strategy": "soft_best_of_n", "temperature": 1e999}])
async def test_infinite_numbers_are_refused(alignment):
    raw = json.dumps({"messages": MSG, "alignment": alignment}).replace("Infinity", "1e999")
    async with _client(make_app()) as c:
        r = await c.post("/v1/chat/completions", content=raw,
                         headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


async def test_long_model_names_and_stop_strings_are_refused():
    r = await _post(make_app(), {"model": "m" * 300, "messages": MSG})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = await _post(make_app(), {"messages": MSG, "stop": "x" * 200_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"


# ---------------------------------------------------------------- limits from the context


async def test_max_tokens_follows_the_context_not_a_fixed_cap():
    engine = FakeEngine()
    engine.max_model_len = 4096
    app = make_app(engine, max_tokens_limit=None, max_prompt_tokens=None)
    r = await _post(app, {"messages": MSG, "max_tokens": 2048})
    assert r.status_code == 200, r.text
    assert engine.calls[-1][2].max_tokens == 2048
    r = await _post(app, {"messages": MSG, "max_tokens": 4096})  # prompt + 4096 > context
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


async def test_a_long_chat_fits_when_the_context_holds_it():
    engine = FakeEngine()
    engine.max_model_len = 4096
    app = make_app(engine, max_tokens_limit=None, max_prompt_tokens=None)
    history = [{"role": r, "content": " ".join(f"w{i}" for i in range(300))}
               for r in ("user", "assistant") * 4] + MSG
    r = await _post(app, {"messages": history, "max_tokens": 16})
    assert r.status_code == 200, r.text
    assert len(engine.calls[-1][0]) > 2400


async def test_the_budget_error_says_how_to_raise_it():
    r = await _post(make_app(max_request_tokens=10), {"messages": MSG, "max_tokens": 8,
                                                      "alignment": BO3})
    assert r.status_code == 400
    assert "--max-request-tokens" in r.json()["error"]["message"]


# ---------------------------------------------------------------- chat template controls


async def test_assistant_prefill_continues_the_last_message():
    engine = FakeEngine()
    app = make_app(engine)
    body = {"messages": [*MSG, {"role": "assistant", "content": "Sure thing"}],
            "max_tokens": 4, "add_generation_prompt": False, "continue_final_message": True}
    r = await _post(app, body)
    assert r.status_code == 200, r.text
    prompt = engine.tokenizer.decode(engine.calls[-1][0])
    assert prompt.endswith("<assistant> Sure thing")  # open: no new turn after the prefill
    bad = await _post(app, {**body, "add_generation_prompt": True})
    assert bad.status_code == 400 and "add_generation_prompt" in bad.json()["error"]["message"]
    bad = await _post(app, {**body, "messages": MSG})
    assert bad.status_code == 400 and "assistant" in bad.json()["error"]["message"]


async def test_template_variables_reach_the_chat_template():
    engine = FakeEngine()
    app = make_app(engine)
    r = await _post(app, {"messages": MSG, "max_tokens": 4, "reasoning_effort": "low",
                          "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text
    prompt = engine.tokenizer.decode(engine.calls[-1][0])
    assert "{enable_thinking=False}" in prompt and "{reasoning_effort=low}" in prompt
    r = await _post(app, {"messages": MSG, "chat_template_kwargs": {"messages": []}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


async def test_the_budget_counts_every_engine_requests_prefill():
    """Many prompts × candidates at max_tokens 1 generate little but prefill a lot."""
    app = make_app(max_request_tokens=200)
    prompt = " ".join(f"w{i}" for i in range(30))
    async with _client(app) as c:
        r = await c.post("/v1/completions", json={
            "prompt": [prompt] * 2, "max_tokens": 1, "n": 2,
            "alignment": {"strategy": "best_of_n", "n": 4}})  # 2 × 4 × 60 = 480 > 200
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "token_budget_exceeded"
        assert r.json()["error"]["param"] == "prompt" and "prefills 480" in r.text
        r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1,
                                                  "alignment": {"strategy": "best_of_n",
                                                                "n": 4}})  # 4 × 30 = 120
        assert r.status_code == 200, r.text


async def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk():
    async with _client(make_app()) as c:
        r = await c.post("/v1/chat/completions", json={
            "messages": MSG, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        bad = await c.post("/v1/chat/completions", json={
            "messages": MSG, "stream": True, "stream_options": {"continuous_usage_stats": True}})
    events = sse_events(r.text)
    used = [e["usage"]["completion_tokens"] for e in events if e["choices"]]
    assert used == sorted(used) and used[-1] == events[-1]["usage"]["completion_tokens"] > 0
    assert all(e["usage"]["prompt_tokens"] == events[-1]["usage"]["prompt_tokens"]
               for e in events)
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "stream_options.continuous_usage_stats"
