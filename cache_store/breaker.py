"""A circuit breaker for the store: after N consecutive failures, skip the backend for a
cool-down instead of piling more connections and timeouts onto a Redis that is down or hung.

closed --N failures in a row--> open --cool-down passed--> half-open (one probe call)
half-open: the probe succeeds -> closed; it fails -> open again for another cool-down.
While open (and while the probe is in flight) calls are skipped at once with CircuitOpen.
Pure logic with an injectable clock; the store calls `allow`, `succeeded` and `failed`.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`failures` <= 0 disables the breaker (every call is allowed)."""
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._consecutive = 0
        self._open_until = 0.0
        self._probing = False
        self.opened = 0
        """Times the breaker has opened (closed or half-open -> open)."""

    @property
    def is_open(self) -> bool:
        return self.threshold > 0 and self._consecutive >= self.threshold

    def retry_in(self) -> float:
        return max(0.0, self._open_until - self._clock())

    def allow(self) -> bool:
        """Whether a call may go to the backend now. In half-open state only one may (the
        probe); it must be followed by `succeeded` or `failed` (or `abandoned`)."""
        if not self.is_open:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        self._consecutive = 0
        self._probing = False

    def failed(self) -> None:
        probing, self._probing = self._probing, False
        if self.threshold <= 0:
            return
        was_open = self.is_open
        self._consecutive += 1
        # Opens on the N-th failure in a row, and again when the half-open probe fails;
        # stragglers that were in flight when it opened do not extend the cool-down.
        if self.is_open and (not was_open or probing):
            self._open_until = self._clock() + self.cooldown_s
            self.opened += 1

    def abandoned(self) -> None:
        """A call ended without saying anything about the backend (e.g. it was cancelled):
        let the next call probe."""
        self._probing = False
