"""Readiness and the graceful drain: against the ASGI app, then through a real uvicorn server
(in this process, on a free port) that receives a real SIGTERM."""

import asyncio
import json
import signal

import httpx
import pytest
import uvicorn
from fakes import FakeEngine, make_app

from server.lifecycle import DrainingServer

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "say something good"}],
        "max_tokens": 8}


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://t")


async def until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_ready_only_after_warm_up_and_not_while_draining():
    engine = FakeEngine()
    engine.gate = asyncio.Event()  # holds the warm-up generation
    app = make_app(engine)
    lc = app.state.lifecycle
    async with app.router.lifespan_context(app), client_for(app) as c:
        await until(lambda: engine.active == 1)
        r = await c.get("/ready")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        engine.gate.set()
        await until(lambda: lc.state == "ready")
        assert (await c.get("/ready")).json() == {"status": "ok"}
        lc.begin_drain()
        r = await c.get("/ready")
        assert r.status_code == 503 and r.json() == {"status": "draining"}
        assert (await c.get("/health")).status_code == 200  # liveness holds while draining
    assert lc.state == "stopped"


async def test_failed_warm_up_keeps_ready_false():
    class Broken(FakeEngine):
        async def generate(self, *a, **k):
            raise RuntimeError("no device")

    app = make_app(Broken())
    async with app.router.lifespan_context(app), client_for(app) as c:
        await until(lambda: app.state.lifecycle.state != "loading")
        r = await c.get("/ready")
        assert r.status_code == 503 and r.json() == {"status": "warmup_failed"}


async def test_drain_refuses_new_requests_and_lets_in_flight_ones_finish():
    engine = FakeEngine()
    app = make_app(engine, retry_after_s=3)
    lc = app.state.lifecycle
    async with client_for(app) as c:
        engine.gate = asyncio.Event()
        inflight = asyncio.create_task(c.post("/v1/chat/completions", json={
            **CHAT, "alignment": {"strategy": "best_of_n", "n": 2}}))
        stream = asyncio.create_task(c.post("/v1/completions", json={"prompt": "hi",
                                                                     "stream": True}))
        await until(lambda: engine.active == 2)
        drain = asyncio.create_task(lc.drain(timeout_s=30))
        await until(lambda: lc.state == "draining")
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == "server_shutting_down"
        assert (await c.get("/v1/models")).status_code == 503
        assert "alignserve:draining 1.0" in (await c.get("/metrics")).text
        assert not drain.done()
        engine.gate.set()
        done = await inflight
        assert done.status_code == 200 and done.json()["choices"][0]["message"]["content"]
        events = (await stream).text
        assert '"error"' not in events and events.rstrip().endswith("data: [DONE]")
        assert await drain is True
        assert engine.cancelled == 0


async def test_drain_deadline_cancels_what_is_left_with_503():
    engine = FakeEngine()
    app = make_app(engine)
    lc = app.state.lifecycle
    async with client_for(app) as c:
        engine.gate = asyncio.Event()  # never opened: these requests would never finish
        inflight = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
        stream = asyncio.create_task(c.post("/v1/chat/completions", json={**CHAT,
                                                                          "stream": True}))
        await until(lambda: engine.active == 2)
        assert await lc.drain(timeout_s=0.2) is False
        r = await inflight
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        lines = [l[6:] for l in (await stream).text.splitlines() if l.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["error"]["code"] == "server_shutting_down"
        assert engine.cancelled == 2 and engine.active == 0


async def test_sigterm_drains_a_real_uvicorn_server():
    engine = FakeEngine()
    app = make_app(engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config, app.state.lifecycle, drain_timeout_s=30)
    serving = asyncio.create_task(server.serve())
    await until(lambda: server.started and app.state.lifecycle.state == "ready")
    port = server.servers[0].sockets[0].getsockname()[1]
    # serve() installed its handler for SIGTERM (we run in the main thread), so the real
    # signal below reaches DrainingServer.handle_exit rather than killing the test process.
    assert signal.getsignal(signal.SIGTERM) == server.handle_exit
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        engine.gate = asyncio.Event()
        inflight = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
        await until(lambda: engine.active == 1)
        signal.raise_signal(signal.SIGTERM)
        await until(lambda: app.state.lifecycle.state == "draining")
        assert (await c.get("/ready")).status_code == 503
        refused = await c.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert (await c.get("/health")).status_code == 200
        assert not serving.done()
        engine.gate.set()
        assert (await inflight).status_code == 200
    await asyncio.wait_for(serving, 30)
    assert server.drained is True and app.state.lifecycle.state == "stopped"
    assert signal.getsignal(signal.SIGTERM) != server.handle_exit  # handler restored


async def test_second_signal_cancels_the_drain():
    engine = FakeEngine()
    app = make_app(engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config, app.state.lifecycle, drain_timeout_s=300)
    serving = asyncio.create_task(server.serve())
    await until(lambda: server.started and app.state.lifecycle.state == "ready")
    port = server.servers[0].sockets[0].getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        engine.gate = asyncio.Event()
        inflight = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
        await until(lambda: engine.active == 1)
        server.handle_exit(signal.SIGTERM, None)
        await until(lambda: app.state.lifecycle.state == "draining")
        server.handle_exit(signal.SIGTERM, None)  # impatient operator: stop now
        r = await inflight
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
    await asyncio.wait_for(serving, 30)
    assert engine.cancelled == 1 and engine.active == 0


@pytest.fixture(autouse=True)
def _no_leftover_handlers():
    before = signal.getsignal(signal.SIGTERM)
    yield
    assert signal.getsignal(signal.SIGTERM) == before
