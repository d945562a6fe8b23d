"""The `Ticket` one admitted request holds to its last byte.

Per request: a slot of `Admission` (429 when full, or when this client already holds its
share), the in-flight gauge, a policy lease (a swap waits for it; during a swap the request
queues at `start`, server/policy/manager.py) and a `Cutoff` (504 on timeout, 503 past the drain
deadline or past a policy swap's drain deadline); the work is cancelled if the client
disconnects.

Where the slot is released matters. A stream's body generator may never run: when the client
is gone before Starlette starts iterating it (Starlette's disconnect listener cancels the
sender before its first step, or the first write fails), an un-started async generator's
`finally` never executes. So a stream's ticket is released by `TicketResponse.__call__`'s
`finally`, which runs whenever the response is called at all; `release` is idempotent, so the
generator's own `finally` (the early release at the last event) and this one may both run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, MutableMapping
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from ..auth import client_identity
from ..constraint import stale_policy_warnings
from ..disconnect import ClientDisconnected, Cutoff, iterate_or_cancel, run_or_cancel
from ..errors import APIError, RequestTimeout, ServerDraining, to_api_error
from ..observability import request_ids
from . import render
from .core import ServingCore
from .data import Answer, ResolvedRequest

log = logging.getLogger(__name__)

T = TypeVar("T")
POLICY_HEADER = "X-Alignserve-Policy"  # the policy that answered (server/policy/manager.py)
# Streams through proxies: never cache, never buffer (nginx honours X-Accel-Buffering).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Past the deadline a stream still sends its in-band error and [DONE]: this long at most.
WRITE_GRACE_S = 5.0


class Ticket:
    """One admitted request. Use as a context manager: leaving it releases the slot, the
    gauge and the lease, unless `stream` handed them to the response (released at its end)."""

    def __init__(self, core: ServingCore, request: Request, strategy: str) -> None:
        s = core.settings
        self.core, self.request, self.metrics = core, request, core.metrics
        gate = core.policies.gate
        self.cutoff = Cutoff(s.request_timeout_s, core.lifecycle.abort, s.retry_after_s,
                             stops=((gate.evict, core.policies.evicted_error),))
        self.t0 = time.perf_counter()
        self._slot: contextlib.AbstractContextManager[None] | None = core.admission.slot(
            client_identity(request.scope), key_limit(s))
        self._slot.__enter__()  # raises a 429 APIError when full
        self.metrics.in_flight.inc()
        # Taken once the request is valid, held to its last byte (streams: last event).
        self._lease = core.policies.lease()
        self._held = True
        self.headers: dict[str, str] = {}
        record = request_ids.current()
        if record is not None:
            record.strategy = strategy

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc) -> None:
        if self._held:
            self.release()

    def release(self) -> None:
        """Give back the slot, the gauge and the lease; idempotent."""
        if self._slot is None:
            return
        slot, self._slot, self._held = self._slot, None, False
        self.metrics.in_flight.dec()
        self._lease.release()
        slot.__exit__(None, None, None)

    async def start(self, rr: ResolvedRequest, response: Response) -> None:
        """The request is valid: wait for the policy lease (under the request's own cutoff and
        disconnect watch: a queued request whose client left, or whose time is up, leaves the
        queue), label and count it."""
        lc, s = self.core.lifecycle, self.core.settings

        def shed() -> Exception:
            return ServerDraining("the server is shutting down during a policy swap; retry the "
                                  "request", s.retry_after_s)

        queue_cutoff = Cutoff(s.request_timeout_s, lc.abort, s.retry_after_s,
                              started=self.cutoff.started, stops=((lc.stopping, shed),))
        try:
            rr.policy = await run_or_cancel(self.request, self._lease.acquire(), queue_cutoff)
        except ClientDisconnected:
            raise APIError(499, "the client closed the request while it was queued",
                           code="client_closed_request") from None
        # a swapped-in checkpoint is not the one the dual's λ was solved on
        rr.warnings.extend(stale_policy_warnings(rr.alignment, self.core.resolver.dual,
                                                 rr.policy))
        self.headers = {POLICY_HEADER: rr.policy}
        record = request_ids.current()
        if record is not None:
            record.policy, record.model = rr.policy, rr.model
        response.headers.update(self.headers)
        self.metrics.requests.labels(rr.strategy_name, rr.kind).inc()

    async def run(self, work: Awaitable[T]) -> T | None:
        """`work` under the cutoff; None when the client went away (its work was aborted)."""
        try:
            return await run_or_cancel(self.request, work, self.cutoff)
        except ClientDisconnected:
            return None

    def finish(self, rr: ResolvedRequest, answers: list[Answer]) -> float:
        """Observe a non-streamed answer; returns its total seconds."""
        total = time.perf_counter() - self.t0
        self.metrics.latency.labels(rr.strategy_name).observe(total)
        # the client sees its first token with the whole response
        self.metrics.time_to_first_token.labels(rr.strategy_name, rr.model,
                                                rr.policy).observe(total)
        self.core.note_answers(rr, answers)
        return total

    def stream(self, rr: ResolvedRequest) -> StreamingResponse:
        """The SSE response; it owns the ticket now and releases it after its last event, or
        when it ends in any other way (see the module docstring)."""
        self._held = False
        return TicketResponse(self, self._events(rr), media_type="text/event-stream",
                              headers={**self.headers, **SSE_HEADERS})

    async def _events(self, rr: ResolvedRequest) -> AsyncIterator[str]:
        try:
            async for event in iterate_or_cancel(self.request, self.core.stream(rr, self.t0),
                                                 self.cutoff):
                yield event
            self.metrics.latency.labels(rr.strategy_name).observe(time.perf_counter() - self.t0)
        except (RequestTimeout, ServerDraining, APIError) as exc:  # headers are sent: in-band
            yield self.core.error_event(to_api_error(exc))
            yield render.DONE
        finally:
            self.release()


class TicketResponse(StreamingResponse):
    """A stream that always gives its ticket back, and whose writes count inside the request's
    deadline: a client that stops reading blocks a write once the socket buffers fill; a
    watchdog (one per response, so a write costs nothing extra) cuts a write still blocked
    `WRITE_GRACE_S` after the deadline or a stop event (the grace lets the in-band error that
    ends a timed-out stream go out)."""

    def __init__(self, ticket: Ticket, content: AsyncIterator[str], **kw) -> None:
        super().__init__(content, **kw)
        self.ticket = ticket
        self._sending: float | None = None  # loop time the write in progress started
        self._stalled = False

    async def __call__(self, scope, receive, send) -> None:
        loop = asyncio.get_running_loop()

        async def timed_send(message: MutableMapping[str, Any]) -> None:
            self._sending = loop.time()
            try:
                await send(message)
            finally:
                self._sending = None

        task = asyncio.current_task()
        assert task is not None
        watchdog = asyncio.ensure_future(self._watch(task))
        try:
            await super().__call__(scope, receive, timed_send)
        except asyncio.CancelledError:
            if not self._stalled:
                raise
            task.uncancel()  # our own cut, not a cancellation from outside
            log.warning("client stopped reading: stream cut at the request deadline")
            self.ticket.metrics.errors.labels("client_stalled", "408").inc()
        finally:
            watchdog.cancel()
            try:  # the generator may be suspended at a yield (or never started): end it now,
                with contextlib.suppress(RuntimeError):  # so its engine work is aborted at once
                    await self.body_iterator.aclose()  # type: ignore[attr-defined]
            finally:
                self.ticket.release()

    async def _watch(self, task: asyncio.Task) -> None:
        """Cancel `task` when a write is still blocked `WRITE_GRACE_S` after the deadline (or
        after a stop event: drain deadline, a swap's drain deadline)."""
        cutoff = self.ticket.cutoff
        stop = cutoff.watch_abort()
        if stop is None:
            if cutoff.remaining() is None:
                return  # nothing ever ends this request: nothing to watch
            await asyncio.sleep(cutoff.remaining() or 0)
        else:
            try:
                await asyncio.wait({stop}, timeout=cutoff.remaining())
            finally:
                stop.cancel()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WRITE_GRACE_S)
            since = self._sending
            if since is not None and loop.time() - since >= WRITE_GRACE_S:
                self._stalled = True
                task.cancel()
                return


def key_limit(s) -> int:
    """Slots one client may hold: the setting, or half of all slots (at least 1)."""
    per_key = s.max_concurrent_requests_per_key
    return per_key if per_key is not None else max(1, s.max_concurrent_requests // 2)
