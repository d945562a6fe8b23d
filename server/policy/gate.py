"""The policy gate and the lease each request holds on it (server/policy/manager.py has the swap).

Readers are requests, the writer is a swap (or an adapter removal). The lease refuses to run a
request on weights in an unknown state (after a reload and its restore both failed).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from ..errors import APIError


class PolicyGate:
    """Readers are requests (a lease each, held until their last byte), the writer is a swap.
    Writer preference: once the gate is closed new requests queue behind it, so a steady flow
    of requests can never starve a swap, and the swap waits only for those already running."""

    def __init__(self) -> None:
        self.held = 0  # requests running on the engine
        self.queued = 0  # requests waiting at the closed gate
        self.peak_queued = 0  # since the gate last closed
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        # Set at a swap's drain deadline: the requests still holding a lease stop with 503
        # (their Cutoff watches it, server/serving/ticket.py); cleared when the gate reopens.
        self.evict = asyncio.Event()

    @property
    def closed(self) -> bool:
        return not self._open.is_set()

    async def enter(self, timeout_s: float, retry_after_s: int) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._open.is_set():  # loop: a second swap may close it again before we run
            self.queued += 1
            self.peak_queued = max(self.peak_queued, self.queued)
            try:
                await asyncio.wait_for(self._open.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise APIError(503, f"a policy swap is in progress and took longer than "
                               f"{timeout_s:g} s; retry the request", type="server_error",
                               code="policy_swap_in_progress",
                               headers={"Retry-After": str(retry_after_s)}) from None
            finally:
                self.queued -= 1
        self.held += 1
        self._idle.clear()

    def leave(self) -> None:
        self.held -= 1
        if self.held == 0:
            self._idle.set()

    def close(self) -> None:
        self.peak_queued = self.queued
        self._open.clear()

    def open(self) -> None:
        self.evict.clear()
        self._open.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class GateHolder(Protocol):
    """What a lease reads from the policy manager (`PolicyManager`, which holds the gate): named
    here so the gate does not import the manager that imports it."""

    settings: Any  # server Settings: policy_queue_timeout_s, retry_after_s
    gate: PolicyGate
    weights_unknown: bool
    active: str


class Lease:
    """One request's hold on the active policy; `release` is idempotent (the serving code calls
    it from one `finally`, whether or not `acquire` ran)."""

    def __init__(self, manager: GateHolder) -> None:
        self._m, self._held = manager, False
        self.policy: str | None = None  # the policy this request runs on

    async def acquire(self) -> str:
        s = self._m.settings
        await self._m.gate.enter(s.policy_queue_timeout_s, s.retry_after_s)
        if self._m.weights_unknown:  # never serve weights nobody can vouch for
            self._m.gate.leave()
            raise APIError(503, "the served weights are in an unknown state after a failed "
                           "policy swap; retry on another replica", type="server_error",
                           code="policy_state_unknown",
                           headers={"Retry-After": str(s.retry_after_s)})
        self._held, self.policy = True, self._m.active
        return self.policy

    def release(self) -> None:
        if self._held:
            self._held = False
            self._m.gate.leave()
