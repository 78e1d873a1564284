"""Graceful shutdown of ``radixfleet serve`` on SIGTERM (a pod being deleted or evicted).

On the first SIGTERM the server starts draining, and keeps listening while it does:

- ``GET /health`` (readiness, and the routers' health check) answers 503 at once, so the
  endpoints and routers stop sending here; ``GET /live`` (liveness) stays 200 (it fails only
  when an engine process has exited, draining or not);
- every other new request gets 503 with a reason, so a router retries it on another worker;
- requests already in flight (streams included) run to the end, for up to the drain timeout;
- then uvicorn shuts down and the process exits 0.

When the scheduler or the detokenizer exits, the server fails what is pending with 503,
answers 503 for a few seconds more, then exits 1 (``DrainingServer``'s watchdog).

A second SIGTERM, or SIGINT, exits without waiting (uvicorn's usual behaviour).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

from radixfleet.engine.server.common import ENGINE_EXITED, error_response

logger = logging.getLogger(__name__)

READINESS_PATH = "/health"
LIVENESS_PATH = "/live"
# Answered while draining; they are not requests to wait for.
PROBE_PATHS = frozenset({READINESS_PATH, LIVENESS_PATH, "/metrics"})
# After an engine process exits, how long the server answers 503 before it exits itself.
ENGINE_EXIT_GRACE_S = 3.0


@dataclass
class Drain:
    """Requests in flight and, once SIGTERM came, the deadline for them."""

    timeout: float
    in_flight: int = 0
    deadline: float | None = None  # time.monotonic() when draining stops waiting

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def begin(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout
            logger.info("SIGTERM: draining %d request(s) in flight, for up to %.0f s", self.in_flight, self.timeout)

    def finished(self) -> bool:
        """True once draining and nothing is in flight, or the deadline passed."""
        if self.deadline is None:
            return False
        if self.in_flight and time.monotonic() < self.deadline:
            return False
        if self.in_flight:
            logger.warning("drain timeout: %d request(s) still in flight are cut off", self.in_flight)
        return True


class DrainMiddleware:
    """Counts requests in flight; while draining refuses new ones (503) and fails readiness.
    Answers liveness itself (before any API key check: a kubelet probe carries none)."""

    def __init__(self, app: Any, drain: Drain, alive: Callable[[], bool]) -> None:
        self.app, self.drain, self.alive = app, drain, alive

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == LIVENESS_PATH:
            if not self.alive():
                return await error_response(503, ENGINE_EXITED)(scope, receive, send)
            return await _ok(scope, receive, send)
        if self.drain.draining and path != "/metrics":
            reason = "the server is shutting down (draining requests in flight); send the request to another server"
            return await error_response(503, reason, code="draining")(scope, receive, send)
        if path in PROBE_PATHS:
            return await self.app(scope, receive, send)
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)  # returns after the last byte of a stream
        finally:
            self.drain.in_flight -= 1


async def _ok(scope: dict, receive: Callable, send: Callable) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


class DrainingServer(uvicorn.Server):
    """uvicorn that turns the first SIGTERM into a drain, then exits normally (code 0).

    Watchdog: once ``alive()`` turns false (the scheduler or the detokenizer exited), the
    pending requests have already failed with 503 (the ``TokenizerManager``); the server stays
    up ``ENGINE_EXIT_GRACE_S`` more (``/health`` and new requests answer 503 saying why), then
    stops with ``engine_exited`` set, so ``radixfleet serve`` exits 1 and is restarted."""

    def __init__(self, config: uvicorn.Config, drain: Drain, alive: Callable[[], bool] = lambda: True) -> None:
        super().__init__(config)
        self.drain, self.alive = drain, alive
        self.engine_exited: float | None = None  # time.monotonic() when the watchdog saw it

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.drain.draining:
            self.drain.begin()  # not recorded as captured: uvicorn would re-raise it at exit
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.engine_exited is None and not self.alive():
            self.engine_exited = time.monotonic()
            logger.error("%s: exiting in %.0f s", ENGINE_EXITED, ENGINE_EXIT_GRACE_S)
        if self.engine_exited is not None and time.monotonic() - self.engine_exited >= ENGINE_EXIT_GRACE_S:
            return True
        return self.drain.finished() or await super().on_tick(counter)
