"""A circuit breaker for a server we depend on (a remote reward model, runtime/remote_scorer.py).

Without one, every request to a dead or hanging reward model server waits out its whole
deadline (and retries) before failing, holding an admission slot and a scorer thread the whole
time: a slow failure turns into a full server. The breaker fails fast instead:

- closed: calls go through; `threshold` failed calls in a row open it;
- open: calls are refused at once (the caller answers 503) for `cooldown_s`;
- half-open: after the cool-down ONE call (the probe) goes through, the others are still
  refused; its success closes the breaker, its failure opens it for another cool-down.

Thread-safe: score calls run in the scorer threads. The state and counts are read at scrape
time (server/metrics.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATES = (CLOSED, OPEN, HALF_OPEN)  # the metric's gauge value is the index


class CircuitBreaker:
    def __init__(self, threshold: int = 5, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if threshold < 1 or cooldown_s < 0:
            raise ValueError("threshold must be ≥ 1 and cooldown_s ≥ 0")
        self.threshold, self.cooldown_s, self._clock = threshold, cooldown_s, clock
        self.state = CLOSED
        self.failures = 0  # consecutive failed calls
        self.opened = 0  # times it opened (a counter)
        self.refused = 0  # calls refused while open (a counter)
        self._opened_at = 0.0
        self._probing = False
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """May a call go out now? (Half-open: True for the one probe only.)"""
        with self._lock:
            if self.state == OPEN and self._clock() - self._opened_at >= self.cooldown_s:
                self.state, self._probing = HALF_OPEN, False
            if self.state == CLOSED or (self.state == HALF_OPEN and not self._probing):
                self._probing = self.state == HALF_OPEN
                return True
            self.refused += 1
            return False

    def success(self) -> None:
        with self._lock:
            self.state, self.failures, self._probing = CLOSED, 0, False

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            if self.state == HALF_OPEN or (self.state == CLOSED
                                           and self.failures >= self.threshold):
                self.state, self._opened_at, self._probing = OPEN, self._clock(), False
                self.opened += 1

    def retry_after_s(self) -> int:
        """Seconds until the next probe may go out (for Retry-After), at least 1."""
        with self._lock:
            left = self.cooldown_s - (self._clock() - self._opened_at)
        return max(1, int(left + 0.999))
