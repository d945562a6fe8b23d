"""Abort work when the HTTP client goes away, when the request times out, or when the server
stops waiting for it (drain deadline passed).

Starlette keeps running a handler after its client disconnects, and (with ASGI spec 2.4) only
notices a closed stream when it next writes, which for an aligned answer can be many seconds
away. So we watch the ASGI receive channel ourselves: after the body is read, the next message
is `http.disconnect`. On it, the work task is cancelled; strategies and the engine wrapper turn
that cancellation into engine aborts in their `finally` blocks. A `Cutoff` adds the two
server-side reasons to stop (`RequestTimeout`, `ServerDraining`), handled the same way, plus
any further stop events (a policy swap's drain deadline).

Writes count too: a client that stops reading blocks the server's writes once the socket
buffers fill, and Starlette notices nothing. A stream's response watches its writes against
the same cutoff (server/serving/ticket.py `TicketResponse`), so a stalled reader is cut and its
slot freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from .errors import RequestTimeout, ServerDraining

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


@dataclass
class Cutoff:
    """When a request's work must stop although its client is still there: `timeout_s` after
    it started (the request timeout), or as soon as `abort` is set (the lifecycle sets it when
    the drain deadline passes), or as soon as one of `stops` is set (event, the error to end
    with: a policy swap's drain deadline, server/policy/manager.py; the start of a drain for
    requests still queued at the policy gate)."""

    timeout_s: float | None = None
    abort: asyncio.Event | None = None
    retry_after_s: int = 1
    started: float = field(default_factory=time.monotonic)
    stops: tuple[tuple[asyncio.Event, Callable[[], Exception]], ...] = ()

    def remaining(self) -> float | None:
        if self.timeout_s is None:
            return None
        return max(0.0, self.started + self.timeout_s - time.monotonic())

    def _events(self) -> list[asyncio.Event]:
        return ([self.abort] if self.abort is not None else []) + [e for e, _ in self.stops]

    def watch_abort(self) -> asyncio.Future | None:
        """A future done once any stop event is set (None when there is none)."""
        events = self._events()
        return asyncio.ensure_future(_first_set(events)) if events else None

    def stop_error(self, aborted: bool) -> Exception:
        if aborted:
            if self.abort is None or not self.abort.is_set():
                for event, error in self.stops:
                    if event.is_set():
                        return error()
            return ServerDraining("the server is shutting down and cancelled this request; "
                                  "retry it", self.retry_after_s)
        return RequestTimeout(self.timeout_s or 0.0)


async def _first_set(events: list[asyncio.Event]) -> None:
    if any(e.is_set() for e in events):
        return
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_or_cancel(request: Request, work: Awaitable[T], cutoff: Cutoff | None = None) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected;
    if the cutoff comes first, cancel it and raise RequestTimeout or ServerDraining."""
    cutoff = cutoff or Cutoff()
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    aborter = cutoff.watch_abort()
    try:
        await asyncio.wait({f for f in (task, watcher, aborter) if f is not None},
                           timeout=cutoff.remaining(), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        if watcher.done():
            raise ClientDisconnected()
        raise cutoff.stop_error(aborted=aborter is not None and aborter.done())
    finally:
        for t in (task, watcher, aborter):
            if t is not None and not t.done():
                t.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        for t in (watcher, aborter):
            if t is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await t


async def iterate_or_cancel(
    request: Request, stream: AsyncIterator[T], cutoff: Cutoff | None = None
) -> AsyncIterator[T]:
    """Re-yield `stream`; stop it (cancelling the pending step) when the client disconnects or
    when this iterator is itself cancelled (Starlette cancels the body iterator on disconnect).
    When the cutoff comes first, stop it the same way, then raise RequestTimeout or
    ServerDraining (the caller reports it in-band). Time spent by the consumer between items
    (writing to a slow client) is not interrupted, only waits for the next item are."""
    cutoff = cutoff or Cutoff()
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    aborter = cutoff.watch_abort()
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(stream.__anext__())
            await asyncio.wait({f for f in (step, watcher, aborter) if f is not None},
                               timeout=cutoff.remaining(), return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                if watcher.done():
                    return  # client gone: `finally` cancels the step
                raise cutoff.stop_error(aborted=aborter is not None and aborter.done())
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        for task in (step, watcher, aborter):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await task
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(RuntimeError):
                await aclose()
