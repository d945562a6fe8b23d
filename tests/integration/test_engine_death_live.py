"""A server of its own whose engine worker is killed (as an OOM kill would) while a request
streams: the stream ends with an in-band error, the probes turn 503, and every new /v1 request
is a 503 with Retry-After (never a 500), on a keep-alive connection that stays usable.
Run last in its module: the server cannot serve afterwards.
"""

from __future__ import annotations

import json
import os
import signal

import httpx
import psutil
import pytest
from live import wait_until

pytestmark = pytest.mark.integration

ASK = {"messages": [{"role": "user", "content": "Tell a long story about a lighthouse."}],
       "max_tokens": 512, "temperature": 1.0, "stream": True}


def engine_workers(pid: int) -> list[psutil.Process]:
    """The server's child processes (vLLM's engine core and its helpers)."""
    return psutil.Process(pid).children(recursive=True)


def test_a_killed_engine_answers_503_with_retry_after(launch_server, tmp_path):
    with launch_server(tmp_path / "server.log", ["--kv-cache-gib", "1"]) as srv:
        base = srv.base_url
        with httpx.Client(base_url=base, timeout=60) as client:  # one keep-alive connection
            events: list[str] = []
            with client.stream("POST", "/v1/chat/completions", json=ASK) as stream:
                lines = stream.iter_lines()
                for line in lines:  # the stream is under way
                    if line.startswith("data:") and '"content":"' in line and len(events) > 2:
                        break
                    events.append(line)
                for proc in engine_workers(srv.proc.pid):
                    os.kill(proc.pid, signal.SIGKILL)
                rest = [line for line in lines if line.startswith("data:")]
            errors = [json.loads(line[5:]) for line in rest if '"error"' in line]
            assert errors and rest[-1] == "data: [DONE]"  # an in-band error, then the end
            assert wait_until(lambda: client.get("/health").status_code == 503, 30)
            assert client.get("/ready").status_code == 503
            for body in ({"messages": ASK["messages"], "max_tokens": 4},
                         {"messages": ASK["messages"], "max_tokens": 4,
                          "alignment": {"strategy": "best_of_n", "n": 2}}):
                r = client.post("/v1/chat/completions", json=body)
                assert r.status_code == 503, r.text
                assert int(r.headers["retry-after"]) > 0
                assert r.json()["error"]["code"] == "engine_unavailable"
        srv.proc.kill()  # the engine is gone: nothing left to drain
        srv.proc.wait(timeout=30)
