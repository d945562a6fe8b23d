"""Admission: bounded concurrency, shared by every endpoint (the drain waits on it too), with a
cap per client so one API key cannot hold every slot."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from ..errors import APIError


class Admission:
    """Bounded concurrency: over the limit, answer 429 at once instead of queueing without end.
    A stream holds its slot until its last event, so `wait_idle` (used by the drain) returns
    only when every admitted request has finished.

    `slot(key, key_limit)` caps the slots one client holds (key: the identity auth found,
    server/auth.py `client_identity`); over it that client gets 429 while others are still
    admitted. key_limit None: only the global limit."""

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit, self.active, self.retry_after_s = limit, 0, retry_after_s
        self.by_key: dict[str, int] = {}  # slots held per client (keys with 0 are dropped)
        self._idle = asyncio.Event()
        self._idle.set()

    def _busy(self, message: str, code: str) -> APIError:
        return APIError(429, message, type="rate_limit_error", code=code,
                        headers={"Retry-After": str(self.retry_after_s)})

    @contextlib.contextmanager
    def slot(self, key: str | None = None, key_limit: int | None = None) -> Iterator[None]:
        if self.active >= self.limit:
            raise self._busy(f"server busy: {self.limit} requests in flight; retry shortly",
                             "too_many_requests")
        held = self.by_key.get(key, 0) if key is not None else 0
        if key is not None and key_limit is not None and held >= key_limit:
            raise self._busy(f"this client already has {held} requests in flight (the most "
                             "one client may hold); retry when one finishes",
                             "too_many_requests_for_key")
        self.active += 1
        if key is not None:
            self.by_key[key] = held + 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if key is not None:
                left = self.by_key.get(key, 1) - 1
                if left:
                    self.by_key[key] = left
                else:
                    self.by_key.pop(key, None)
            if self.active == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()
