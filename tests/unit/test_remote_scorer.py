"""`remote:NAME` scorers against a fake vLLM pooling server (httpx.MockTransport): request
shapes (one batched /classify, raw logits), input rendering modes, retries, and the clean
502/503/504 the client gets when the reward model server fails."""

from __future__ import annotations

import json

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


def scorer(rm: FakeRM, monkeypatch, tokenizer=None, **kw) -> rs.RemoteScorer:
    monkeypatch.setattr(rs, "_local_tokenizer", lambda path: tokenizer)
    monkeypatch.setattr(rs.time, "sleep", lambda s: None)  # backoff: no real waiting
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


def test_start_up_names_a_server_that_does_not_answer(monkeypatch):
    monkeypatch.setattr(rs.time, "sleep", lambda s: None)
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
