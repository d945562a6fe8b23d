"""Admission: bounded concurrency, shared by every endpoint (the drain waits on it too)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from ..errors import APIError


class Admission:
    """Bounded concurrency: over the limit, answer 429 at once instead of queueing without end.
    A stream holds its slot until its last event, so `wait_idle` (used by the drain) returns
    only when every admitted request has finished."""

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit, self.active, self.retry_after_s = limit, 0, retry_after_s
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise APIError(429, f"server busy: {self.limit} requests in flight; retry shortly",
                           type="rate_limit_error", code="too_many_requests",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()
