"""A per-worker circuit breaker: closed → open → half-open → closed.

Closed: requests flow. After ``failure_threshold`` consecutive failures it opens: the
worker is skipped for ``cooldown`` seconds. Then it is half-open: exactly one request (the
probe) may go through; success closes the circuit, failure opens it for another cooldown.
"""

from __future__ import annotations

import enum
import time


class CircuitState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Decides whether a worker may take a request, from its recent outcomes."""

    def __init__(self, failure_threshold: int, cooldown: float) -> None:
        assert failure_threshold >= 1, "failure_threshold must be >= 1"
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> CircuitState:
        """Current state; an open circuit whose cooldown has passed reads as half-open."""
        if self._state is CircuitState.OPEN and time.monotonic() - self._opened_at >= self.cooldown:
            self._state = CircuitState.HALF_OPEN
            self._probe_in_flight = False
        return self._state

    def available(self) -> bool:
        """Whether a request may be sent now (does not claim the half-open probe)."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        return state is CircuitState.HALF_OPEN and not self._probe_in_flight

    def on_dispatch(self) -> None:
        """A request is being sent; in half-open state it becomes the single probe."""
        if self.state is CircuitState.HALF_OPEN:
            self._probe_in_flight = True

    def record_success(self) -> None:
        self._failures = 0
        self._state = CircuitState.CLOSED
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._state is CircuitState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._state = CircuitState.OPEN
            self._opened_at = time.monotonic()
            self._probe_in_flight = False
