"""A circuit breaker for a remote tier. Pure Python, with an injectable clock.

closed: calls go through; ``failure_threshold`` failures in a row open it.
open: calls are refused (a miss, at once) until ``reset_after_s`` has passed; then one trial call goes through
(half-open): success closes the breaker, failure opens it again for another ``reset_after_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(self, failure_threshold: int, reset_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False
        self.times_opened = 0

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if self._trial_in_flight or self._clock() - self._opened_at >= self.reset_after_s:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        """May a call go out now? In half-open state, only the one trial call may."""
        if self._opened_at is None:
            return True
        if self._trial_in_flight or self._clock() - self._opened_at < self.reset_after_s:
            return False
        self._trial_in_flight = True
        return True

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._trial_in_flight or self._failures >= self.failure_threshold:
            if self._opened_at is None or self._trial_in_flight:
                self.times_opened += 1
            self._opened_at = self._clock()
            self._trial_in_flight = False
