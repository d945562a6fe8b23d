"""A server of its own (real engine, started through the CLI as in a container): API keys from a
file and the admin key from the environment, then SIGTERM while a long aligned request runs.
The shared session server is never signalled.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal

import httpx
import pytest
from live import wait_until

pytestmark = pytest.mark.integration

USER_KEY = "live-user-key-123456"
ADMIN_KEY = "live-admin-key-0123456789abcdef"
LONG = {"messages": [{"role": "user", "content": "Write a very long story about dragons, with "
                                                   "many chapters and details."}],
        "max_tokens": 256, "temperature": 1.0, "alignment": {"strategy": "best_of_n", "n": 8}}


@pytest.fixture(scope="module")
def own_server(launch_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("own-server")
    keys = folder / "api-keys"
    keys.write_text(f"# test keys\n{USER_KEY}\n")
    with launch_server(folder / "server.log", ["--kv-cache-gib", "1"], env={
            "ALIGNSERVE_API_KEYS_FILE": str(keys), "ALIGNSERVE_ADMIN_KEY": ADMIN_KEY,
            "ALIGNSERVE_DRAIN_TIMEOUT_S": "240", "ALIGNSERVE_RETRY_AFTER_S": "5"}) as srv:
        yield srv


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_on_the_real_server(own_server):
    base = own_server.base_url
    r = httpx.get(f"{base}/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.post(f"{base}/v1/chat/completions", json=LONG, headers=auth("wrong-key-1234567"),
                   timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{base}/v1/models", headers=auth(USER_KEY), timeout=10).status_code == 200
    assert httpx.get(f"{base}/admin/status", headers=auth(USER_KEY), timeout=10).status_code == 403
    status = httpx.get(f"{base}/admin/status", headers=auth(ADMIN_KEY), timeout=10).json()
    assert status["state"] == "ready" and status["user_keys"] == 1
    for open_route in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{base}{open_route}", timeout=10).status_code == 200
    log = own_server.log.read_text()
    assert USER_KEY not in log and ADMIN_KEY not in log


def test_sigterm_drains_then_stops_the_engine(own_server):
    base, proc = own_server.base_url, own_server.proc
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        inflight = pool.submit(httpx.post, f"{base}/v1/chat/completions", json=LONG,
                               headers=auth(USER_KEY), timeout=300)
        assert wait_until(lambda: own_server.metric("alignserve:engine_requests_unfinished") > 0, 60)
        os.kill(proc.pid, signal.SIGTERM)
        assert wait_until(lambda: httpx.get(f"{base}/ready", timeout=5).status_code == 503, 10)
        assert httpx.get(f"{base}/ready", timeout=5).json() == {"status": "draining"}
        refused = httpx.post(f"{base}/v1/chat/completions", json=LONG, headers=auth(USER_KEY),
                             timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "server_shutting_down"
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200  # liveness holds
        status = httpx.get(f"{base}/admin/status", headers=auth(ADMIN_KEY), timeout=5).json()
        assert status["state"] == "draining" and status["requests_in_flight"] == 1
        assert proc.poll() is None  # still serving the request in flight
        done = inflight.result(timeout=300)
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["alignment"]["scored_candidates"] == 8
    assert proc.wait(timeout=120) == 0  # a clean exit, not death by the signal
    log = own_server.log.read_text()
    for line in ("draining for up to", "drained: no request in flight", "stopping the engine",
                 "engine stopped"):
        assert line in log, line
    assert log.index("drained: no request in flight") < log.index("engine stopped")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/health", timeout=5)
