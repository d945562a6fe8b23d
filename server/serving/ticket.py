"""The `Ticket` one admitted request holds to its last byte.

Per request: a slot of `Admission` (429 when full), the in-flight gauge, a policy lease (a
swap waits for it; during a swap the request queues at `start`, server/policies.py) and a
`Cutoff` (504 on timeout, 503 past the drain deadline); the work is cancelled if the client
disconnects.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from .. import tracing
from ..disconnect import ClientDisconnected, Cutoff, iterate_or_cancel, run_or_cancel
from ..errors import RequestTimeout, ServerDraining, to_api_error
from . import render
from .core import ServingCore
from .data import Answer, ResolvedRequest

T = TypeVar("T")
POLICY_HEADER = "X-Alignserve-Policy"  # the policy that answered (server/policies.py)
# Streams through proxies: never cache, never buffer (nginx honours X-Accel-Buffering).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Ticket:
    """One admitted request. Use as a context manager: leaving it releases the slot, the
    gauge and the lease, unless `stream` handed them to the response (released at its end)."""

    def __init__(self, core: ServingCore, request: Request, strategy: str) -> None:
        s = core.settings
        self.core, self.request, self.metrics = core, request, core.metrics
        self.cutoff = Cutoff(s.request_timeout_s, core.lifecycle.abort, s.retry_after_s)
        self.t0 = time.perf_counter()
        self._slot = core.admission.slot()
        self._slot.__enter__()  # raises a 429 APIError when full
        self.metrics.in_flight.inc()
        # Taken once the request is valid, held to its last byte (streams: last event).
        self._lease = core.policies.lease()
        self._held = True
        self.headers: dict[str, str] = {}
        record = tracing.current()
        if record is not None:
            record.strategy = strategy

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc) -> None:
        if self._held:
            self.release()

    def release(self) -> None:
        self._held = False
        self.metrics.in_flight.dec()
        self._lease.release()
        self._slot.__exit__(None, None, None)

    async def start(self, rr: ResolvedRequest, response: Response) -> None:
        """The request is valid: wait for the policy lease, label and count it."""
        rr.policy = await self._lease.acquire()
        self.headers = {POLICY_HEADER: rr.policy}
        record = tracing.current()
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
        """The SSE response; it owns the slot now and releases it after its last event."""
        self._held = False
        return StreamingResponse(self._events(rr), media_type="text/event-stream",
                                 headers={**self.headers, **SSE_HEADERS})

    async def _events(self, rr: ResolvedRequest) -> AsyncIterator[str]:
        try:
            async for event in iterate_or_cancel(self.request, self.core.stream(rr, self.t0),
                                                 self.cutoff):
                yield event
            self.metrics.latency.labels(rr.strategy_name).observe(time.perf_counter() - self.t0)
        except (RequestTimeout, ServerDraining) as exc:  # headers are sent: report in-band
            yield self.core.error_event(to_api_error(exc))
            yield render.DONE
        finally:
            self.release()
