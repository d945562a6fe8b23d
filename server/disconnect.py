"""Abort work when the HTTP client goes away.

Starlette keeps running a handler after its client disconnects, and (with ASGI spec 2.4) only
notices a closed stream when it next writes, which for an aligned answer can be many seconds
away. So we watch the ASGI receive channel ourselves: after the body is read, the next message
is `http.disconnect`. On it, the work task is cancelled; strategies and the engine wrapper turn
that cancellation into engine aborts in their `finally` blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_or_cancel(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def iterate_or_cancel(request: Request, stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Re-yield `stream`; stop it (cancelling the pending step) when the client disconnects or
    when this iterator is itself cancelled (Starlette cancels the body iterator on disconnect)."""
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(stream.__anext__())
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                return  # client gone: `finally` cancels the step
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        for task in (step, watcher):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await task
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(RuntimeError):
                await aclose()
