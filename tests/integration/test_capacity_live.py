"""Capacity always comes back, on the real engine (a server of its own: admin key, short
request timeout, a policy root over this session's temporary folders):

- clients that vanish at every stage (right after sending, after the headers, mid-stream, while
  queued at a policy swap's closed gate) leave `requests_in_flight` and
  `engine_requests_unfinished` at 0, and a swap still succeeds afterwards;
- a client that stops reading is cut at the request timeout (its slot comes back while its
  socket is still open);
- a checkpoint that loads but produces garbage (all weights zero) is rolled back by the canary
  generation, one with NaN weights is refused before the engine sees it, and the base policy
  keeps answering the same greedy text.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from live import wait_until

pytestmark = pytest.mark.integration

ADMIN_KEY = "live-capacity-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TIMEOUT_S = 15  # request timeout of this module's server
LONG = {"messages": [{"role": "user", "content": "Tell a very long story about a dragon."}],
        "max_tokens": 400, "temperature": 1.0}


@pytest.fixture(scope="module")
def srv(launch_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("capacity-server")
    root = tmp_path_factory.getbasetemp()
    with launch_server(folder / "server.log",
                       ["--kv-cache-gib", "1", "--policy-root", str(root)],
                       env={"ALIGNSERVE_ADMIN_KEY": ADMIN_KEY,
                            "ALIGNSERVE_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
                            "ALIGNSERVE_POLICY_DRAIN_TIMEOUT_S": "60"}) as s:
        yield s


def status(srv) -> dict:
    return httpx.get(f"{srv.base_url}/admin/status", headers=ADMIN, timeout=10).json()


def idle(srv) -> bool:
    st = status(srv)
    return st["requests_in_flight"] == 0 and st["engine_requests_unfinished"] == 0


def swapping(srv) -> bool:
    return httpx.get(f"{srv.base_url}/admin/policies", headers=ADMIN,
                     timeout=10).json()["swapping"]


def raw_post(srv, body: dict, path: str = "/v1/chat/completions",
             rcvbuf: int | None = None) -> socket.socket:
    """Send a request on a socket of our own and return it unread (the caller hangs up)."""
    url = urlparse(srv.base_url)
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((url.hostname, url.port))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def hang_up(sock: socket.socket) -> None:
    """An abrupt close: RST, not FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def _checkpoint(srv, out: Path, fill: float) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    base = Path(httpx.get(f"{srv.base_url}/admin/policies", headers=ADMIN,
                          timeout=10).json()["data"][0]["path"])
    out.mkdir(parents=True)
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    weights = load_file(str(base / "model.safetensors"))
    save_file({n: torch.full(t.shape, fill, dtype=torch.float32) for n, t in weights.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_abrupt_disconnects_at_every_stage_leave_nothing_and_a_swap_succeeds(
        srv, tmp_path_factory):
    bodies = [LONG, {**LONG, "stream": True},
              {**LONG, "max_tokens": 64, "alignment": {"strategy": "best_of_n", "n": 4}},
              {**LONG, "max_tokens": 64, "stream": True,
               "alignment": {"strategy": "best_of_n", "n": 4}}]
    for body in bodies:  # right after sending: during parsing / tokenisation
        for _ in range(3):
            hang_up(raw_post(srv, body))
    for body in bodies:  # after the first bytes of the answer (streams) or mid-work
        sock = raw_post(srv, body)
        if body.get("stream"):
            sock.settimeout(60)
            assert sock.recv(1)
        else:
            assert wait_until(lambda: status(srv)["engine_requests_unfinished"] > 0, 30)
        hang_up(sock)
    assert wait_until(lambda: idle(srv), 30), status(srv)

    # queued at a swap's closed gate: a stream holds the drain open meanwhile
    target = _checkpoint_copy(srv, tmp_path_factory.mktemp("same") / "ck")
    holder = raw_post(srv, {**LONG, "stream": True})
    holder.settimeout(60)
    assert holder.recv(1)
    with httpx.Client(timeout=120) as c:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            swap = pool.submit(c.post, f"{srv.base_url}/admin/policies", headers=ADMIN,
                               json={"name": "same", "path": str(target)})
            assert wait_until(lambda: swapping(srv), 30)
            queued = [raw_post(srv, body) for body in bodies for _ in range(2)]
            time.sleep(0.5)  # let them reach the gate (nothing to observe per request)
            for sock in queued:
                hang_up(sock)
            hang_up(holder)  # the drain can finish now
            r = swap.result()
    assert r.status_code == 200, r.text
    assert wait_until(lambda: idle(srv), 30), status(srv)
    r = httpx.post(f"{srv.base_url}/admin/policies/base/activate", headers=ADMIN, timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{srv.base_url}/v1/chat/completions", timeout=120,
                   json={**LONG, "max_tokens": 8})
    assert r.status_code == 200 and r.headers["x-alignserve-policy"] == "base"
    assert idle(srv)


def _checkpoint_copy(srv, out: Path) -> Path:
    base = Path(httpx.get(f"{srv.base_url}/admin/policies", headers=ADMIN,
                          timeout=10).json()["data"][0]["path"])
    shutil.copytree(base, out)  # a symlink would point outside the policy root
    return out


def test_client_that_stops_reading_is_cut_at_the_timeout(srv):
    # 4 choices with 20 top log-probs per token: megabytes of events, never read
    body = {**LONG, "n": 4, "logprobs": True, "top_logprobs": 20, "stream": True}
    sock = raw_post(srv, body, rcvbuf=4096)
    try:
        assert wait_until(lambda: status(srv)["requests_in_flight"] == 1, 30)
        t0 = time.monotonic()
        assert wait_until(lambda: idle(srv), TIMEOUT_S + 30), status(srv)
        assert time.monotonic() - t0 <= TIMEOUT_S + 30
    finally:
        hang_up(sock)


@pytest.mark.parametrize("fill", [float("nan"), 0.0], ids=["nan", "zero"])
def test_checkpoint_that_generates_garbage_is_rolled_back(srv, tmp_path_factory, fill):
    before = httpx.post(f"{srv.base_url}/v1/chat/completions", timeout=120,
                        json={**LONG, "max_tokens": 12, "temperature": 0}).json()
    bad = _checkpoint(srv, tmp_path_factory.mktemp("garbage") / "ck", fill)
    r = httpx.post(f"{srv.base_url}/admin/policies", headers=ADMIN, timeout=300,
                   json={"name": f"garbage-{'nan' if fill != fill else 'zero'}",
                         "path": str(bad)})
    assert r.status_code == 400, r.text
    # NaN weights never reach the engine (their NaN keys/values would poison its KV cache for
    # the restored weights too); zero weights load and fail the canary (a flat distribution)
    code = "nonfinite_weights" if fill != fill else "policy_canary_failed"
    assert r.json()["error"]["code"] == code
    assert httpx.get(f"{srv.base_url}/health", timeout=10).status_code == 200
    after = httpx.post(f"{srv.base_url}/v1/chat/completions", timeout=120,
                       json={**LONG, "max_tokens": 12, "temperature": 0})
    assert after.status_code == 200 and after.headers["x-alignserve-policy"] == "base"
    assert after.json()["choices"][0]["message"]["content"] == \
        before["choices"][0]["message"]["content"]
