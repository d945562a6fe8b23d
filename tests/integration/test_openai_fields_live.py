"""OpenAI/vLLM request fields on the real engine through the official SDK: each test would fail
if the field were ignored. Cheap: max_tokens ≤ 16, alignment.n ≤ 4, the session server."""

from __future__ import annotations

import json
import math
from collections import Counter

import httpx
import pytest
from live import wait_until

pytestmark = pytest.mark.integration

SEA = [{"role": "user", "content": "Write one sentence about the sea."}]


def _bon(n=4, **extra):
    return {"alignment": {"strategy": "best_of_n", "n": n, "return_candidates": True, **extra}}


def _candidates(choice) -> list[dict]:
    return choice.model_extra["alignment"]["candidates"]


def test_logit_bias_bans_a_token_from_every_candidate(client, model_name):
    kw = {"model": model_name, "messages": SEA, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    first = client.chat.completions.create(**kw, extra_body=_bon())
    seen = Counter(t for c in _candidates(first.choices[0]) for t in c["token_ids"])
    banned, count = seen.most_common(1)[0]
    assert count >= 2  # a token the model uses: banning it changes the candidates
    r = client.chat.completions.create(**kw, logit_bias={str(banned): -100}, extra_body=_bon())
    for c in _candidates(r.choices[0]):
        assert banned not in c["token_ids"]


def test_json_schema_gives_parseable_json_for_every_candidate(client, model_name):
    schema = {"type": "object", "properties": {"answer": {"type": "string",
                                                          "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Is the sea salty? Answer in "
                                     "JSON."}], max_tokens=16, temperature=1.0, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        extra_body=_bon(3))
    for c in _candidates(r.choices[0]):
        assert json.loads(c["text"])["answer"] in ("yes", "no"), c
    assert json.loads(r.choices[0].message.content)["answer"] in ("yes", "no")


def test_json_object_constrains_every_candidate(client, model_name):
    r = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Give a JSON object with a "
                                     "name."}], max_tokens=16, temperature=1.0, seed=4,
        response_format={"type": "json_object"}, extra_body=_bon(3))
    for c in _candidates(r.choices[0]):
        text = c["text"].strip()
        assert text.startswith("{"), c  # free text would rarely start so
        if c["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)


def test_logprobs_of_the_chosen_answer_sum_to_its_candidate_logprob(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=SEA, max_tokens=12, seed=5,
                                       logprobs=True, top_logprobs=2, extra_body=_bon(3))
    choice = r.choices[0]
    content = choice.logprobs.content
    (chosen,) = [c for c in _candidates(choice) if c["text"] == choice.message.content][:1]
    assert len(content) == chosen["tokens"] == r.usage.completion_tokens
    assert math.isclose(sum(t.logprob for t in content), chosen["logprob"], abs_tol=1e-3)
    assert all(1 <= len(t.top_logprobs) <= 2 for t in content)
    assert all(max(a.logprob for a in t.top_logprobs) >= t.logprob - 1e-4 or
               len(t.top_logprobs) < 2 for t in content)


def test_streamed_completion_logprobs(client, model_name):
    chunks = list(client.completions.create(model=model_name, prompt="The sea is", max_tokens=8,
                                            logprobs=1, stream=True, seed=2))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.tokens]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert tokens and "".join(tokens) == text


def test_min_tokens_holds_for_every_candidate(client, model_name):
    r = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Say hi."}], max_tokens=16,
        seed=6, extra_body={"min_tokens": 14, **_bon(3)})
    for c in _candidates(r.choices[0]):
        assert c["tokens"] >= 14, c


def test_stop_token_ids_end_every_candidate(client, model_name):
    kw = {"model": model_name, "messages": SEA, "max_tokens": 16, "temperature": 1.0, "seed": 8}
    first = client.chat.completions.create(**kw, extra_body=_bon(3))
    seen = Counter(t for c in _candidates(first.choices[0]) for t in c["token_ids"][1:])
    stop = seen.most_common(1)[0][0]
    r = client.chat.completions.create(**kw, extra_body={"stop_token_ids": [stop], **_bon(3)})
    for c in _candidates(r.choices[0]):
        assert stop not in c["token_ids"][:-1]
        if stop in c["token_ids"]:
            assert c["finish_reason"] == "stop"


def _spr(n=4, **extra):
    return {"alignment": {"strategy": "speculative_rejection", "n": n, "alpha": 0.5,
                          "decision_tokens": 4, "return_candidates": True, **extra}}


def test_speculative_rejection_logit_bias_bans_a_token_from_every_track(client, model_name):
    kw = {"model": model_name, "messages": SEA, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    first = client.chat.completions.create(**kw, extra_body=_spr())
    seen = Counter(t for c in _candidates(first.choices[0]) for t in c["token_ids"])
    banned, count = seen.most_common(1)[0]
    assert count >= 2
    r = client.chat.completions.create(**kw, logit_bias={str(banned): -100}, extra_body=_spr())
    for c in _candidates(r.choices[0]):  # rejected tracks too: every token they decoded
        assert banned not in c["token_ids"]


def test_speculative_rejection_json_object_and_min_tokens_hold_for_every_track(client,
                                                                               model_name):
    r = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Give a JSON object with a "
                                     "name."}], max_tokens=16, temperature=1.0, seed=4,
        response_format={"type": "json_object"}, extra_body=_spr())
    for c in _candidates(r.choices[0]):
        assert c["text"].strip().startswith("{"), c  # partial (rejected) tracks too
        if c["finish_reason"] == "stop":
            assert isinstance(json.loads(c["text"]), dict)
    r = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Say hi."}], max_tokens=16,
        seed=6, extra_body={"min_tokens": 14, **_spr()})
    finished = [c for c in _candidates(r.choices[0]) if c["finish_reason"] is not None]
    assert finished and all(c["tokens"] >= 14 for c in finished), finished


def test_speculative_rejection_logprobs_of_the_chosen_track(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=SEA, max_tokens=12, seed=5,
                                       logprobs=True, top_logprobs=2, extra_body=_spr())
    choice = r.choices[0]
    (chosen,) = [c for c in _candidates(choice) if c["finish_reason"] is not None
                 and c["text"] == choice.message.content][:1]
    content = choice.logprobs.content
    assert len(content) == chosen["tokens"] == r.usage.completion_tokens
    assert math.isclose(sum(t.logprob for t in content), chosen["logprob"], abs_tol=1e-3)
    assert all(1 <= len(t.top_logprobs) <= 2 for t in content)


def test_refusals_name_the_field(client, model_name):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=SEA, max_tokens=4,
                                       tools=[{"type": "function",
                                               "function": {"name": "f", "parameters": {}}}])
    # tools without tool_choice: auto, which needs a tool-call parser this server has none of
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model_name, messages=SEA, max_tokens=4, response_format={"type": "json_object"},
            extra_body={"alignment": {"strategy": "blockwise_cd", "n": 2}})
    assert e.value.body["param"] == "response_format" and "blockwise_cd" in e.value.body["message"]


def test_sse_headers_role_first_and_keep_alive_during_best_of_n(server, model_name):
    """The session server sends keep-alives every 0.1 s (conftest): best-of-n with 4 forced
    16-token candidates takes longer than that before its answer exists."""
    body = {"model": model_name, "messages": SEA, "max_tokens": 16, "stream": True,
            "min_tokens": 16, "alignment": {"strategy": "best_of_n", "n": 4}}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body,
                      headers={"X-Request-Id": "live-trace-42"}, timeout=300) as r:
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        assert r.headers["x-request-id"] == "live-trace-42"
        lines = [line for line in r.iter_lines() if line]
    assert '"role":"assistant"' in lines[0]
    first_content = next(i for i, line in enumerate(lines) if '"content":"' in line
                         and '"content":""' not in line)
    assert ": keep-alive" in lines[1:first_content]
    assert lines[-1] == "data: [DONE]"


def test_request_id_round_trip_and_in_the_log(server, model_name):
    r = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=120,
                   headers={"X-Request-Id": "live-rid-7"},
                   json={"model": model_name, "messages": SEA, "max_tokens": 4})
    assert r.headers["x-request-id"] == "live-rid-7" and r.json()["id"] == "chatcmpl-live-rid-7"
    bad = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=30,
                     headers={"X-Request-Id": "live-rid-8"}, json={"messages": []})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "live-rid-8"

    def access() -> list[str]:
        return [line for line in server.log.read_text().splitlines()
                if "alignserve.access" in line]

    # the access line is written once the last byte went out: it may trail the response
    assert wait_until(lambda: any("[live-rid-8]" in line and " 400 " in line
                                  for line in access()), timeout=10), access()[-5:]
    assert any("[live-rid-7]" in line and " 200 " in line and "strategy=none" in line
               and "completion_tokens=" in line for line in access()), access()[-5:]


def test_tokenize_detokenize_version(server, model_name):
    base = server.base_url
    t = httpx.post(f"{base}/tokenize", json={"model": model_name, "messages": SEA}).json()
    assert t["count"] == len(t["tokens"]) > 5 and t["max_model_len"] >= 1024
    d = httpx.post(f"{base}/detokenize", json={"tokens": t["tokens"]}).json()
    assert "Write one sentence about the sea." in d["prompt"]
    assert httpx.get(f"{base}/version").json()["vllm"]
