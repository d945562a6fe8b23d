"""HTTP layer against fakes: schema, alignment block, streaming, every bad input, limits."""

import asyncio
import json

import httpx
import pytest
from fakes import FakeEngine, make_app

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "say something good"}],
        "max_tokens": 8}


def sse_events(text: str) -> list:
    lines = [l[len("data: "):] for l in text.splitlines() if l.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(l) for l in lines[:-1]]


async def test_plain_chat_has_openai_shape(client):
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "fake"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] == len(choice["message"]["content"].split())
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "alignment" not in body or body["alignment"] is None


async def test_best_of_n_reports_candidates_and_kl(client):
    req = {**CHAT, "alignment": {"strategy": "best_of_n", "n": 6, "reward": "good_count",
                                 "cost": "bad_count", "cost_weight": 0.5, "return_candidates": True}}
    body = (await client.post("/v1/chat/completions", json=req)).json()
    a = body["choices"][0]["alignment"]
    assert a == body["alignment"]
    cands = a["candidates"]
    assert len(cands) == 6 and a["scored_candidates"] == 6
    scores = [c["reward"] - 0.5 * c["cost"] for c in cands]
    best = cands[scores.index(max(scores))]
    assert body["choices"][0]["message"]["content"] == best["text"]
    assert (a["reward"], a["cost"]) == (best["reward"], best["cost"])
    assert a["generated_tokens"] == sum(c["tokens"] for c in cands)
    assert a["kl_bound"] == pytest.approx(1.791759469 - 5 / 6)
    assert 0 <= a["kl_estimate"] <= a["kl_bound"] + 1e-9
    assert a["win_rate_bound"] == pytest.approx(6 / 7)
    assert set(a["latency"]) == {"generate_s", "score_s", "total_s"}


async def test_each_choice_is_its_own_aligned_answer(client, engine):
    req = {**CHAT, "n": 3, "alignment": {"strategy": "best_of_n", "n": 4}}
    body = (await client.post("/v1/chat/completions", json=req)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    per = [c["alignment"]["generated_tokens"] for c in body["choices"]]
    assert body["alignment"]["generated_tokens"] == sum(per)
    assert len(engine.calls) == 3 and all(call[1] == 4 for call in engine.calls)


async def test_completions_batch_prompts_and_choices(client):
    r = await client.post("/v1/completions", json={"prompt": ["good day", "bad day"], "n": 2,
                                                   "max_tokens": 4})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 4


async def test_chat_stream_with_usage_and_alignment(client):
    req = {**CHAT, "stream": True, "stream_options": {"include_usage": True},
           "alignment": {"strategy": "best_of_n", "n": 3}}
    r = await client.post("/v1/chat/completions", json=req)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    final = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]][0]
    assert final["alignment"]["strategy"] == "best_of_n" and final["alignment"]["n"] == 3
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == len(text.split())


async def test_plain_stream_streams_tokens(client):
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 6, "stream": True,
                                                   "n": 2})
    events = sse_events(r.text)
    pieces = [e for e in events if e["choices"] and e["choices"][0]["text"]]
    assert len(pieces) >= 2  # token by token, not one blob
    assert {e["choices"][0]["index"] for e in pieces} <= {0, 1}
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 2


BAD = [
    ("invalid json", b"{not json", 400, "invalid_json"),
    ("missing messages", {"model": "fake"}, 400, None),
    ("empty messages", {"messages": []}, 400, None),
    ("bad role", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("negative max_tokens", {**CHAT, "max_tokens": -1}, 400, None),
    ("max_tokens too large", {**CHAT, "max_tokens": 10_000}, 400, "invalid_value"),
    ("n zero", {**CHAT, "n": 0}, 400, None),
    ("n too large", {**CHAT, "n": 99}, 400, "invalid_value"),
    ("alignment n too large", {**CHAT, "alignment": {"strategy": "best_of_n", "n": 999}}, 400,
     "invalid_value"),
    ("unknown strategy", {**CHAT, "alignment": {"strategy": "magic"}}, 400, "unknown_strategy"),
    ("unknown scorer", {**CHAT, "alignment": {"strategy": "best_of_n", "reward": "nope"}}, 400,
     "unknown_scorer"),
    ("unknown cost", {**CHAT, "alignment": {"strategy": "best_of_n", "cost": "nope"}}, 400,
     "unknown_scorer"),
    ("alpha of one", {**CHAT, "alignment": {"strategy": "speculative_rejection", "alpha": 1.0}},
     400, None),
    ("decision_tokens zero", {**CHAT, "alignment": {"strategy": "speculative_rejection",
                                                   "decision_tokens": 0}}, 400, None),
    ("typo in alignment", {**CHAT, "alignment": {"strategy": "best_of_n", "nn": 2}}, 400, None),
    ("temperature out of range", {**CHAT, "temperature": 7}, 400, None),
    ("prompt too long", {**CHAT, "messages": [{"role": "user", "content": "word " * 100}]}, 400,
     "context_length_exceeded"),
    ("template rejects", {**CHAT, "messages": [{"role": "assistant", "content": "hi"}]}, 400,
     "invalid_messages"),
    ("unknown model", {**CHAT, "model": "gpt-9"}, 404, "model_not_found"),
]


@pytest.mark.parametrize("name,body,status,code", BAD, ids=[b[0] for b in BAD])
async def test_bad_input_gets_openai_shaped_4xx(client, name, body, status, code):
    if isinstance(body, bytes):
        r = await client.post("/v1/chat/completions", content=body,
                              headers={"content-type": "application/json"})
    else:
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code
    # and the server keeps serving
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_completion_token_ids_out_of_vocab(client):
    r = await client.post("/v1/completions", json={"prompt": [1, 2, 10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


async def test_scorer_crash_is_a_shaped_500_without_details(client):
    r = await client.post("/v1/chat/completions",
                          json={**CHAT, "alignment": {"strategy": "best_of_n", "reward": "exploding"}})
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "internal server error", "type": "server_error",
                                 "param": None, "code": "internal_error"}


async def test_body_limit():
    app = make_app(max_body_bytes=2048)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "user": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


async def test_over_concurrency_limit_gets_429_with_retry_after():
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    app = make_app(engine, max_concurrent_requests=1)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        first = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
        while engine.active == 0:
            await asyncio.sleep(0.01)
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        engine.gate.set()
        assert (await first).status_code == 200
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_models_health_metrics(client):
    models = (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "fake"
    assert (await client.get("/health")).json() == {"status": "ok"}
    await client.post("/v1/chat/completions", json={**CHAT, "alignment": {"strategy": "best_of_n",
                                                                         "n": 2}})
    await client.post("/v1/chat/completions", json={**CHAT, "n": 99})
    text = (await client.get("/metrics")).text
    assert 'alignserve:requests_total{endpoint="chat",strategy="best_of_n"} 1.0' in text
    assert 'alignserve:candidates_total{strategy="best_of_n"} 2.0' in text
    assert 'alignserve:kl_bound_count{strategy="best_of_n"} 1.0' in text
    assert 'alignserve:errors_total{status="400",type="invalid_request_error"} 1.0' in text
    assert "alignserve:requests_in_flight 0.0" in text
    assert "alignserve:engine_requests_unfinished 0.0" in text
    assert "alignserve:engine_aborts_total 0.0" in text


async def test_speculative_rejection_over_http(client):
    req = {**CHAT, "max_tokens": 32, "n": 2, "alignment": {
        "strategy": "speculative_rejection", "n": 8, "alpha": 0.5, "decision_tokens": 4,
        "return_candidates": True}}
    body = (await client.post("/v1/chat/completions", json=req)).json()
    for choice in body["choices"]:
        a = choice["alignment"]
        assert a["strategy"] == "speculative_rejection" and a["kl_estimate"] is None
        assert a["kl_bound"] == pytest.approx(2.0794415, abs=1e-6)
        assert a["rounds"] >= 1 and isinstance(a["rejected"], list)
        assert len(a["candidates"]) == 8
        assert choice["message"]["content"] in {c["text"] for c in a["candidates"]}


async def test_an_option_of_another_strategy_is_a_400_naming_it(client):
    r = await client.post("/v1/chat/completions", json={
        **CHAT, "alignment": {"strategy": "best_of_n", "n": 2, "alpha": 0.5}})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "alignment.alpha" and "best_of_n" in err["message"]
    r = await client.post("/v1/chat/completions", json={
        **CHAT, "alignment": {"strategy": "magic"}})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "alignment.strategy"
    assert err["code"] == "unknown_strategy" and "'magic'" in err["message"]


async def test_soft_best_of_n_accepts_the_deprecated_temperature_alias(client):
    for key in ("selection_temperature", "temperature"):
        r = await client.post("/v1/chat/completions", json={
            **CHAT, "alignment": {"strategy": "soft_best_of_n", "n": 2, key: 0.5}})
        assert r.status_code == 200, r.text
