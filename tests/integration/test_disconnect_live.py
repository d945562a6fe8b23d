"""A client that goes away must not leave work running in the engine."""

from __future__ import annotations

import httpx
import pytest
from live import wait_until

pytestmark = pytest.mark.integration

LONG = {"prompt": "Here is a very long story about dragons, told in great detail:",
        "max_tokens": 600, "temperature": 1.0,
        "alignment": {"strategy": "best_of_n", "n": 8}}


def _abort_count(server) -> float:
    return server.metric("alignserve:engine_aborts_total")


def _unfinished(server) -> float:
    return server.metric("alignserve:engine_requests_unfinished")


def test_streaming_disconnect_aborts_engine_work(server):
    before = _abort_count(server)
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{server.base_url}/v1/completions", json={**LONG, "stream": True}):
            assert wait_until(lambda: _unfinished(server) > 0, 30), "engine never started"
        # leaving the block closes the connection mid-generation
    assert wait_until(lambda: _unfinished(server) == 0, 5), "engine request still running"
    assert wait_until(lambda: _abort_count(server) > before, 5)


def test_non_streaming_disconnect_aborts_engine_work(server):
    before = _abort_count(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=LONG, timeout=httpx.Timeout(
            3.0, connect=5.0))
    assert wait_until(lambda: _unfinished(server) == 0, 5), "engine request still running"
    assert wait_until(lambda: _abort_count(server) > before, 5)
