"""A circuit breaker for a server we depend on (a remote reward model, runtime/remote_scorer.py).

Without one, every request to a dead or hanging reward model server waits out its whole
deadline (and retries) before failing, holding an admission slot and a scorer thread the whole
time: a slow failure turns into a full server. The breaker fails fast instead:

- closed: calls go through; `threshold` failed calls in a row open it;
- open: calls are refused at once (the caller answers 503) for `cooldown_s`;
- half-open: after the cool-down `probes` calls go through (one by default), the others are
  still refused; when that many succeed the breaker closes, and any failure opens it for
  another cool-down.

The three numbers are settings (runtime/settings.py `remote_scorer_breaker_*`), passed through
`BreakerConfig`.

Thread-safe: score calls run in the scorer threads. The state and counts are read at scrape
time (server/observability/metrics.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATES = (CLOSED, OPEN, HALF_OPEN)  # the metric's gauge value is the index


@dataclass(frozen=True)
class BreakerConfig:
    """The breaker's numbers, from settings: `threshold` failed calls in a row open it; it stays
    open `cooldown_s`; then `probes` calls must succeed to close it."""

    threshold: int = 5
    cooldown_s: float = 30.0
    probes: int = 1

    def build(self, clock: Callable[[], float] = time.monotonic) -> CircuitBreaker:
        return CircuitBreaker(self.threshold, self.cooldown_s, clock, probes=self.probes)


class CircuitBreaker:
    def __init__(self, threshold: int = 5, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, *, probes: int = 1) -> None:
        if threshold < 1 or cooldown_s < 0 or probes < 1:
            raise ValueError("threshold must be ≥ 1, cooldown_s ≥ 0 and probes ≥ 1")
        self.threshold, self.cooldown_s, self._clock = threshold, cooldown_s, clock
        self.probes = probes
        self.state = CLOSED
        self.failures = 0  # consecutive failed calls
        self.opened = 0  # times it opened (a counter)
        self.refused = 0  # calls refused while open (a counter)
        self._opened_at = 0.0
        self._issued = 0  # half-open: probes let through since it half-opened
        self._passed = 0  # half-open: of those, succeeded
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """May a call go out now? (Half-open: True for the first `probes` calls only.)"""
        with self._lock:
            if self.state == OPEN and self._clock() - self._opened_at >= self.cooldown_s:
                self.state, self._issued, self._passed = HALF_OPEN, 0, 0
            if self.state == CLOSED:
                return True
            if self.state == HALF_OPEN and self._issued < self.probes:
                self._issued += 1
                return True
            self.refused += 1
            return False

    def success(self) -> None:
        with self._lock:
            if self.state == HALF_OPEN:
                self._passed += 1
                if self._passed < self.probes:  # more probes must pass before it closes
                    return
            self.state, self.failures = CLOSED, 0

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            if self.state == HALF_OPEN or (self.state == CLOSED
                                           and self.failures >= self.threshold):
                self.state, self._opened_at = OPEN, self._clock()
                self.opened += 1

    def retry_after_s(self) -> int:
        """Seconds until the next probe may go out (for Retry-After), at least 1."""
        with self._lock:
            left = self.cooldown_s - (self._clock() - self._opened_at)
        return max(1, int(left + 0.999))
