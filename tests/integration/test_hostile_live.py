"""Hostile requests and a broken reward model against the real server (issue 25): `hf:` names
are refused without loading anything and without echoing them; a stub reward model server that
answers NaN, "nan", true, duplicate indices or a wrong shape gives the client a generic 502, one
that trickles bytes a 504 at the call's deadline, and enough failures in a row open the circuit
breaker (fast 503 + Retry-After, shown on /metrics); a chunked body over the limit is a 413.

The stub is a tiny threaded HTTP server in this process speaking vLLM's pooling API (/v1/models,
/classify); it refuses chat-form input, so alignserve sends every response of a call in one
batched /classify request, where index checks matter."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

pytestmark = pytest.mark.integration

TIMEOUT_S = 3  # the remote scorer's deadline per call
BODY_LIMIT = 65_536


class Stub(BaseHTTPRequestHandler):
    mode = "ok"  # set by the test: what /classify answers
    classify_calls = 0

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._json(200, json.dumps({"data": [{"id": "stub-rm", "root": "/nonexistent/stub"}]}))

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if "messages" in body:  # no chat template: alignserve batches plain inputs
            return self._json(400, json.dumps({"error": {"message": "no chat template"}}))
        type(self).classify_calls += 1
        inputs, mode = body["input"], type(self).mode
        if mode == "trickle":
            return self._trickle()
        value = {"ok": None, "nan": float("nan"), "inf": float("inf"), "nan_string": "nan",
                 "true": True}.get(mode)
        data = [{"index": 0 if mode == "dup" else i, "num_classes": 1,
                 "probs": [len(t) / 100 if value is None else value]}
                for i, t in enumerate(inputs)]
        # Python's json writes the NaN/Infinity literals a broken server might send
        self._json(200, json.dumps([1.0] * len(inputs) if mode == "shape" else {"data": data}))

    def _trickle(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "100000")
        self.end_headers()
        with contextlib.suppress(OSError):  # alignserve hangs up at its deadline
            for _ in range(100):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.25)


@pytest.fixture(scope="module")
def stub():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def srv(stub, launch_server, tmp_path_factory):
    args = ["--remote-scorer", f"stub={stub}", "--remote-scorer-timeout-s", str(TIMEOUT_S),
            "--remote-scorer-retries", "0", "--max-body-bytes", str(BODY_LIMIT)]
    with launch_server(tmp_path_factory.mktemp("hostile") / "server.log", args) as s:
        yield s


def _ask(srv, reward: str, stream: bool = False) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 6,
            "temperature": 1.0, "seed": 1, "stream": stream,
            "alignment": {"strategy": "best_of_n", "n": 3, "reward": reward}}
    return httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=120)


def test_hf_names_are_refused_without_loading_or_echoing(srv):
    messages = set()
    for name in ("hf:gpt2", "hf:/etc", "hf:/nonexistent/model", "hf:/proc/self/cwd"):
        r = _ask(srv, name)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "unknown_scorer" and err["param"] == "alignment.reward"
        assert name[3:] not in err["message"]
        messages.add(err["message"])
    assert len(messages) == 1  # the same answer whether the path exists or not
    assert "remote:stub" in messages.pop()  # it lists what may be named
    assert "from_pretrained" not in srv.log.read_text()


def test_a_broken_reward_model_gives_a_generic_502(srv):
    Stub.mode = "ok"
    ok = _ask(srv, "remote:stub")
    assert ok.status_code == 200, ok.text
    for mode in ("nan", "nan_string", "true", "inf", "dup", "shape"):
        Stub.mode = mode
        r = _ask(srv, "remote:stub")
        assert r.status_code == 502, (mode, r.text)
        err = r.json()["error"]
        assert err == {"message": "remote:stub gave an invalid answer", "type": "server_error",
                       "param": None, "code": "reward_model_error"}, mode
        Stub.mode = "ok"  # a success between failures: the breaker stays closed
        assert _ask(srv, "remote:stub").status_code == 200
    Stub.mode = "nan"
    s = _ask(srv, "remote:stub", stream=True)
    assert s.status_code == 200 and "reward_model_error" in s.text
    assert "NaN" not in s.text and "127.0.0.1" not in s.text
    Stub.mode = "ok"
    assert _ask(srv, "remote:stub").status_code == 200


def test_a_trickling_reward_model_hits_the_deadline_then_the_breaker_opens(srv):
    Stub.mode = "trickle"
    r = _ask(srv, "remote:stub")
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "reward_model_timeout"
    Stub.mode = "nan"
    for _ in range(4):  # five failed calls in a row (default threshold) open the breaker
        assert _ask(srv, "remote:stub").status_code == 502
    calls = Stub.classify_calls
    r = _ask(srv, "remote:stub")
    assert r.status_code == 503 and r.json()["error"]["code"] == "reward_model_unavailable"
    assert int(r.headers["retry-after"]) >= 1
    assert Stub.classify_calls == calls  # refused here, the reward model never asked
    assert srv.metric('alignserve:remote_scorer_circuit_state{scorer="remote:stub"}') == 1.0
    assert srv.metric("alignserve:remote_scorer_circuit_opened_total") == 1.0
    Stub.mode = "ok"


def test_a_chunked_body_over_the_limit_is_413(srv):
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(BODY_LIMIT // 4096 + 2):
            yield b"x" * 4096
        yield b'"}], "max_tokens": 2}'

    r = httpx.post(f"{srv.base_url}/v1/chat/completions", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=60)
    assert "content-length" not in r.request.headers
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    # and the server still answers
    assert httpx.get(f"{srv.base_url}/health", timeout=10).status_code == 200
