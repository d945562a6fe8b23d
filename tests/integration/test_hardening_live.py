"""Issue 25 leftovers on the real engine: /metrics behind a metrics token, /tokenize capped in size
and admitted like a generation request (one server of this module's own: one admission slot,
a small /tokenize cap, a metrics token)."""

import httpx
import pytest

METRICS_TOKEN = "metrics-token-live-0123456789"
AUTH = {"Authorization": f"Bearer {METRICS_TOKEN}"}


@pytest.fixture(scope="module")
def srv(launch_server, tmp_path_factory):
    args = ["--max-concurrent-requests", "1", "--tokenize-max-chars", "2000"]
    with launch_server(tmp_path_factory.mktemp("hardening") / "server.log", args,
                       env={"ALIGNSERVE_METRICS_TOKEN": METRICS_TOKEN}) as s:
        yield s


def gauges(base_url: str) -> dict[str, float]:
    r = httpx.get(f"{base_url}/metrics", headers=AUTH, timeout=10)
    assert r.status_code == 200
    out = {}
    for line in r.text.splitlines():
        if line.startswith("alignserve:") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_need_the_token(srv):
    r = httpx.get(f"{srv.base_url}/metrics", timeout=10)
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["type"] == "authentication_error" and err["code"] == "missing_api_key"
    assert httpx.get(f"{srv.base_url}/metrics", headers={"Authorization": "Bearer nope-nope"},
                     timeout=10).status_code == 401
    ok = httpx.get(f"{srv.base_url}/metrics", headers=AUTH, timeout=10)
    assert ok.status_code == 200 and "vllm:" in ok.text  # vLLM's own metrics too
    assert httpx.get(f"{srv.base_url}/health", timeout=10).status_code == 200


def test_tokenize_is_capped_with_a_400_naming_the_field(srv):
    r = httpx.post(f"{srv.base_url}/tokenize", json={"prompt": "hello " * 400}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{srv.base_url}/tokenize", json={"messages": [
        {"role": "user", "content": "x" * 2001}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    ok = httpx.post(f"{srv.base_url}/tokenize", json={"prompt": "hello " * 300}, timeout=30)
    assert ok.status_code == 200 and ok.json()["count"] >= 300


def test_tokenize_takes_an_admission_slot_like_generation(srv):
    body = {"model": httpx.get(f"{srv.base_url}/v1/models").json()["data"][0]["id"],
            "messages": [{"role": "user", "content": "Write a long story about a cat."}],
            "max_tokens": 96, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=srv.base_url, timeout=300) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # admitted, generating
            busy = c.post("/tokenize", json={"prompt": "hello"})
            assert busy.status_code == 429, busy.text
            assert busy.json()["error"]["type"] == "rate_limit_error"
            assert "retry-after" in busy.headers
            assert gauges(srv.base_url)["alignserve:admission_slots_held"] == 1
            # to the response's end: the slot is released before the last chunk goes out
            assert "data: [DONE]" in list(lines)
        assert c.post("/tokenize", json={"prompt": "hello"}).status_code == 200
    g = gauges(srv.base_url)
    assert g["alignserve:admission_slots_held"] == 0
    assert g["alignserve:requests_in_flight"] == 0
    assert g["alignserve:policy_leases_held"] == 0
