"""Client disconnects cancel the work (and so abort engine requests), streaming or not."""

import asyncio

import pytest
from fakes import FakeEngine, WordReward

from decoding.context import DecodeContext
from decoding.request import DecodeRequest, Objective
from decoding.strategies import STRATEGIES
from decoding.types import Sampling
from server.disconnect import ClientDisconnected, iterate_or_cancel, run_or_cancel


class FakeRequest:
    """Stands in for starlette's Request: `receive` yields http.disconnect once `gone` is set."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self):
        await self.gone.wait()
        return {"type": "http.disconnect"}


def bon(engine):
    req = DecodeRequest([1, 2], "p", Sampling(max_tokens=8), n=4, objective=Objective(WordReward()))
    return STRATEGIES["best_of_n"].run(req, DecodeContext(engine))


async def wait_active(engine):
    while engine.active == 0:
        await asyncio.sleep(0)


async def test_non_streaming_disconnect_cancels_engine_work():
    engine, request = FakeEngine(), FakeRequest()
    engine.gate = asyncio.Event()
    task = asyncio.create_task(run_or_cancel(request, bon(engine)))
    await wait_active(engine)
    request.gone.set()
    with pytest.raises(ClientDisconnected):
        await task
    assert engine.cancelled == 1 and engine.active == 0


async def test_finished_work_is_returned():
    engine, request = FakeEngine(), FakeRequest()
    result = await run_or_cancel(request, bon(engine))
    assert result.n == 4 and engine.finished == 1


async def _events(engine):
    yield "first"
    yield (await bon(engine)).sample.text


async def test_streaming_disconnect_cancels_the_pending_step():
    engine, request = FakeEngine(), FakeRequest()
    engine.gate = asyncio.Event()
    seen = []

    async def consume():
        async for item in iterate_or_cancel(request, _events(engine)):
            seen.append(item)

    task = asyncio.create_task(consume())
    await wait_active(engine)
    request.gone.set()
    await task
    assert seen == ["first"] and engine.cancelled == 1 and engine.active == 0


async def test_cancelling_the_stream_consumer_cancels_the_pending_step():
    # Starlette cancels the body iterator itself when it notices the disconnect first.
    engine, request = FakeEngine(), FakeRequest()
    engine.gate = asyncio.Event()

    async def consume():
        async for _ in iterate_or_cancel(request, _events(engine)):
            pass

    task = asyncio.create_task(consume())
    await wait_active(engine)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.cancelled == 1 and engine.active == 0
