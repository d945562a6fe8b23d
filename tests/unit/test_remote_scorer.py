"""`remote:NAME` scorers against a fake vLLM pooling server (httpx.MockTransport): request
shapes (one batched /classify, raw logits), input rendering modes, retries, and the clean
502/503/504 the client gets when the reward model server fails."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from fakes import make_app

import runtime.remote_scorer as rs
from runtime.remote_scorer import UpstreamUnavailable
from runtime.settings import EngineSettings, parse_remote_scorers
from server.errors import to_api_error


class Template:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize=False):
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)


class FakeRM:
    """A vLLM pooling server: /v1/models and /classify (reward = length of the input)."""

    def __init__(self, chat: bool = True, fail: list[Exception | int] | None = None) -> None:
        self.chat, self.fail = chat, list(fail or [])
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.fail:
            what = self.fail.pop(0)
            if isinstance(what, Exception):
                raise what
            return httpx.Response(what, text="boom")
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "rm", "root": "/models/rm"}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        if "messages" in body:
            if not self.chat:
                return httpx.Response(400, json={"error": {"message": "no chat template"}})
            inputs = ["|".join(m["content"] for m in body["messages"])]
        else:
            inputs = body["input"]
        data = [{"index": i, "label": "LABEL_0", "probs": [float(len(t))], "num_classes": 1}
                for i, t in enumerate(inputs)]
        return httpx.Response(200, json={"data": data})


def scorer(rm, monkeypatch, tokenizer=None, **kw) -> rs.RemoteScorer:
    monkeypatch.setattr(rs, "_local_tokenizer", lambda path: tokenizer)
    kw.setdefault("backoff_s", 0.0)  # no real waiting between retries
    return rs.RemoteScorer("rm", "http://rm:8000/", transport=httpx.MockTransport(rm), **kw)


def test_batch_mode_sends_all_responses_in_one_request_with_raw_logits(monkeypatch):
    rm = FakeRM()
    s = scorer(rm, monkeypatch, tokenizer=Template()).connect()
    assert s.mode == "batch" and s.model == "rm" and s.name == "remote:rm"
    rm.bodies.clear()
    assert s.score("hi", ["a", "bcd"]) == [len("user:hi|assistant:a"),
                                           len("user:hi|assistant:bcd")]
    (body,) = rm.bodies
    assert body["input"] == ["user:hi|assistant:a", "user:hi|assistant:bcd"]
    assert body["use_activation"] is False and body["model"] == "rm"
    assert body["add_special_tokens"] is False  # the chat template carries them
    assert s.stats.calls == 1 and s.stats.requests["ok"] >= 1


def test_chat_mode_when_the_tokenizer_is_not_here(monkeypatch):
    rm = FakeRM()
    s = scorer(rm, monkeypatch).connect()
    assert s.mode == "chat"
    rm.bodies.clear()
    assert s.score("p", ["xy", "z", "uvw"]) == [len("p|xy"), len("p|z"), len("p|uvw")]
    assert sorted(len(b["messages"][1]["content"]) for b in rm.bodies) == [1, 2, 3]


def test_plain_mode_without_a_chat_template(monkeypatch):
    rm = FakeRM(chat=False)
    s = scorer(rm, monkeypatch).connect()
    assert s.mode == "plain"
    rm.bodies.clear()
    assert s.score("p", ["ab"]) == [len("p\nab")]
    assert rm.bodies[0]["add_special_tokens"] is True


def test_transient_failures_are_retried(monkeypatch):
    rm = FakeRM()
    s = scorer(rm, monkeypatch, tokenizer=Template(), retries=2).connect()
    rm.fail = [httpx.ConnectError("refused"), 503]
    assert s.score("hi", ["a"]) == [len("user:hi|assistant:a")]
    assert s.stats.retries == 2
    assert s.stats.requests["unreachable"] == 1 and s.stats.requests["server_error"] == 1


@pytest.mark.parametrize("failure, status, code", [
    (httpx.ConnectError("refused"), 503, "reward_model_unavailable"),
    (httpx.ReadTimeout("slow"), 504, "reward_model_timeout"),
    (500, 502, "reward_model_error"),
])
def test_persistent_failures_become_clean_5xx(monkeypatch, failure, status, code):
    rm = FakeRM()
    s = scorer(rm, monkeypatch, tokenizer=Template(), retries=1).connect()
    rm.fail = [failure] * 2
    with pytest.raises(UpstreamUnavailable) as info:
        s.score("hi", ["a"])
    err = to_api_error(info.value)
    assert (err.status, err.code, err.type) == (status, code, "server_error")
    assert "remote:rm" in err.message


def test_a_4xx_is_not_retried(monkeypatch):
    rm = FakeRM()
    s = scorer(rm, monkeypatch, tokenizer=Template(), retries=3).connect()
    rm.fail = [400]
    with pytest.raises(UpstreamUnavailable, match="refused"):
        s.score("hi", ["a"])
    assert s.stats.retries == 0


def test_start_up_names_a_server_that_does_not_answer():
    with pytest.raises(ValueError, match="remote scorer 'rm' at http://127.0.0.1:9"):
        rs.connect_remote_scorers({"rm": "http://127.0.0.1:9"}, timeout_s=1, retries=0)


def test_remote_scorer_urls_parse():
    assert parse_remote_scorers("rm=http://a:8000/, safety = https://b") == {
        "rm": "http://a:8000", "safety": "https://b"}
    for bad in ("rm", "rm=ftp://x", "a=http://x,a=http://y"):
        with pytest.raises(ValueError):
            parse_remote_scorers(bad)
    assert EngineSettings(remote_scorers="rm=http://x").remote_scorer_urls() == {"rm": "http://x"}


async def test_a_failing_reward_server_gives_the_client_503_and_shows_in_metrics(monkeypatch):
    rm = FakeRM()
    s = scorer(rm, monkeypatch, tokenizer=Template(), retries=0).connect()
    app = make_app()
    app.state.runtime.scorers.register(s)
    req = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
           "alignment": {"strategy": "best_of_n", "n": 3, "reward": "remote:rm"}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        ok = await c.post("/v1/chat/completions", json=req)
        assert ok.status_code == 200, ok.text
        rm.fail = [httpx.ConnectError("refused")]
        r = await c.post("/v1/chat/completions", json=req)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "reward_model_unavailable"
        rm.fail = [httpx.ConnectError("refused")]
        stream = await c.post("/v1/chat/completions", json={**req, "stream": True}, timeout=30)
        assert "reward_model_unavailable" in stream.text  # in-band once headers are sent
        metrics = (await c.get("/metrics")).text
    assert 'alignserve:remote_scorer_requests_total{outcome="unreachable",scorer="remote:rm"} 2.0' \
        in metrics


# -- hardening (issue 25): strict answers, a total deadline, generic messages, a breaker -------


class Answering(FakeRM):
    """A pooling server whose /classify answers `answer(inputs)` (any JSON) after start-up."""

    def __init__(self, answer) -> None:
        super().__init__()
        self.answer, self.armed = answer, False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not self.armed or request.url.path != "/classify":
            return super().__call__(request)
        body = json.loads(request.content)
        self.bodies.append(body)
        # Python's json (not httpx's strict one): NaN/Infinity literals, as a broken server
        return httpx.Response(200, content=json.dumps(self.answer(body["input"])),
                              headers={"content-type": "application/json"})


def _item(i, value):
    return {"index": i, "probs": [value], "num_classes": 1}


BAD_ANSWERS = {
    "nan string": lambda xs: {"data": [_item(i, "nan") for i in range(len(xs))]},
    "boolean": lambda xs: {"data": [_item(i, True) for i in range(len(xs))]},
    "null": lambda xs: {"data": [_item(i, None) for i in range(len(xs))]},
    "duplicate index": lambda xs: {"data": [_item(0, 1.0) for _ in xs]},
    "index out of range": lambda xs: {"data": [_item(i + 1, 1.0) for i in range(len(xs))]},
    "index a string": lambda xs: {"data": [_item(str(i), 1.0) for i in range(len(xs))]},
    "too few": lambda xs: {"data": [_item(0, 1.0)]},
    "too many": lambda xs: {"data": [_item(i, 1.0) for i in range(len(xs) + 1)]},
    "a list": lambda xs: [1.0] * len(xs),
    "data not a list": lambda xs: {"data": "many"},
    "items not objects": lambda xs: {"data": [1.0] * len(xs)},
    "no probs": lambda xs: {"data": [{"index": i} for i in range(len(xs))]},
    "empty probs": lambda xs: {"data": [{"index": i, "probs": []} for i in range(len(xs))]},
}


@pytest.mark.parametrize("kind", BAD_ANSWERS, ids=list(BAD_ANSWERS))
def test_a_wrong_answer_is_a_generic_502(monkeypatch, kind):
    rm = Answering(BAD_ANSWERS[kind])
    s = scorer(rm, monkeypatch, tokenizer=Template()).connect()
    rm.armed = True
    with pytest.raises(UpstreamUnavailable) as info:
        s.score("hi", ["a", "b"])
    err = to_api_error(info.value)
    assert (err.status, err.code) == (502, "reward_model_error")
    assert err.message == "remote:rm gave an invalid answer"  # no URL, no body
    assert s.stats.requests["bad_answer"] == 1
    s.close()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_json_numbers_are_refused(monkeypatch, value):
    rm = Answering(lambda xs: {"data": [_item(i, value) for i in range(len(xs))]})
    s = scorer(rm, monkeypatch, tokenizer=Template()).connect()
    rm.armed = True
    with pytest.raises(UpstreamUnavailable, match="invalid answer") as info:
        s.score("hi", ["a"])
    assert info.value.status == 502
    s.close()


def test_indices_in_any_order_are_put_back_in_order(monkeypatch):
    rm = Answering(lambda xs: {"data": [_item(i, float(i)) for i in reversed(range(len(xs)))]})
    s = scorer(rm, monkeypatch, tokenizer=Template()).connect()
    rm.armed = True
    assert s.score("hi", ["a", "b", "c"]) == [0.0, 1.0, 2.0]
    s.close()


def test_client_messages_name_the_scorer_only(monkeypatch, caplog):
    rm = FakeRM()
    s = scorer(rm, monkeypatch, tokenizer=Template(), retries=0).connect()
    for failure in (httpx.ConnectError("refused by 10.0.0.7"), 500, 400):
        rm.fail = [failure]
        with pytest.raises(UpstreamUnavailable) as info:
            s.score("hi", ["a"])
        message = to_api_error(info.value).message
        assert message.startswith("remote:rm ") and "rm:8000" not in message
        assert "boom" not in message and "10.0.0.7" not in message
    logged = caplog.text
    assert "http://rm:8000" in logged and "boom" in logged  # the details are logged instead
    s.close()


def _trickle(request: httpx.Request) -> httpx.Response:
    """/v1/models answers; /classify sends one byte every 50 ms, for ever."""
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": "rm"}]})

    async def body():
        yield b'{"data": ['
        while True:
            await asyncio.sleep(0.05)
            yield b" "

    return httpx.Response(200, content=body())


def test_a_trickling_server_hits_the_total_deadline(monkeypatch):
    monkeypatch.setattr(rs, "_local_tokenizer", lambda path: Template())
    s = rs.RemoteScorer("rm", "http://rm:8000", timeout_s=0.5, retries=2,
                        transport=httpx.MockTransport(_trickle), backoff_s=0.0)
    s.mode, s.model = "plain", "rm"
    with pytest.raises(UpstreamUnavailable) as info:
        s.score("hi", ["a"])  # every read is quick: only a deadline on the whole call ends it
    assert (info.value.status, info.value.code) == (504, "reward_model_timeout")
    assert s.stats.requests == {"deadline": 1}  # no retry after the deadline
    s.close()


async def test_a_cancelled_request_leaves_no_scorer_thread_waiting(monkeypatch):
    """The request that wanted the scores is gone; its scorer thread is free by the deadline."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(rs, "_local_tokenizer", lambda path: Template())

    entered = threading.Event()

    async def hang(request):
        entered.set()
        await asyncio.Event().wait()  # never answers

    s = rs.RemoteScorer("rm", "http://rm:8000", timeout_s=0.3, retries=0,
                        transport=httpx.MockTransport(hang))
    s.mode, s.model = "plain", "rm"
    pool = ThreadPoolExecutor(1)
    task = asyncio.get_running_loop().run_in_executor(pool, s.score, "hi", ["a"])
    await asyncio.to_thread(entered.wait)
    task.cancel()  # what a client disconnect does to the awaiting coroutine
    pool.shutdown(wait=True)  # returns: the thread finished (504 raised inside it)
    assert s.stats.requests == {"deadline": 1} and s.stats.calls == 1
    s.close()


def test_circuit_breaker_opens_fails_fast_and_probes(monkeypatch):
    from runtime.circuit import CircuitBreaker

    now = [0.0]
    rm = FakeRM()
    s = scorer(rm, monkeypatch, tokenizer=Template(), retries=0,
               breaker=CircuitBreaker(threshold=2, cooldown_s=10, clock=lambda: now[0])).connect()
    sent = len(rm.bodies)
    rm.fail = [500, 500]
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable, match="answered with an error"):
            s.score("hi", ["a"])
    assert s.breaker.state == "open" and s.breaker.opened == 1
    with pytest.raises(UpstreamUnavailable) as info:  # refused without a request
        s.score("hi", ["a"])
    err = to_api_error(info.value)
    assert (err.status, err.code) == (503, "reward_model_unavailable")
    assert err.headers == {"Retry-After": "10"}
    assert len(rm.bodies) == sent and s.stats.requests["circuit_open"] == 1
    now[0] = 11.0  # cool-down over: one probe goes out; it fails → open again
    rm.fail = [500]
    with pytest.raises(UpstreamUnavailable, match="answered with an error"):
        s.score("hi", ["a"])
    assert s.breaker.state == "open" and s.breaker.opened == 2
    now[0] = 22.0  # the next probe succeeds → closed
    assert s.score("hi", ["a"]) == [len("user:hi|assistant:a")]
    assert s.breaker.state == "closed" and s.breaker.failures == 0
    s.close()


def test_a_4xx_does_not_open_the_breaker(monkeypatch):
    from runtime.circuit import CircuitBreaker

    rm = FakeRM()
    s = scorer(rm, monkeypatch, tokenizer=Template(), breaker=CircuitBreaker(threshold=1)).connect()
    rm.fail = [400]
    with pytest.raises(UpstreamUnavailable, match="refused"):
        s.score("hi", ["a"])
    assert s.breaker.state == "closed"  # the server is up; the input was the problem
    s.close()


def test_half_open_lets_exactly_one_probe_through():
    from runtime.circuit import CircuitBreaker

    now = [0.0]
    b = CircuitBreaker(threshold=1, cooldown_s=5, clock=lambda: now[0])
    assert b.allow()
    b.failure()
    assert b.state == "open" and not b.allow() and b.refused == 1
    now[0] = 5.0
    assert b.allow() and b.state == "half_open"
    assert not b.allow()  # the probe is out: others still fail fast
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()


async def test_breaker_state_is_in_metrics(monkeypatch):
    from runtime.circuit import CircuitBreaker

    rm = FakeRM()
    s = scorer(rm, monkeypatch, tokenizer=Template(), retries=0,
               breaker=CircuitBreaker(threshold=1, cooldown_s=600)).connect()
    app = make_app()
    app.state.runtime.scorers.register(s)
    rm.fail = [500]
    with pytest.raises(UpstreamUnavailable):
        s.score("hi", ["a"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        metrics = (await c.get("/metrics")).text
    assert 'alignserve:remote_scorer_circuit_state{scorer="remote:rm"} 1.0' in metrics
    assert 'alignserve:remote_scorer_circuit_opened_total{scorer="remote:rm"} 1.0' in metrics
    s.close()
