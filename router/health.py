"""Worker health: one-shot checks, waiting for a new worker, and the periodic checker."""

from __future__ import annotations

import asyncio
import logging
import time

from .registry import WorkerRegistry
from .upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)


async def is_healthy(upstream: Upstream, url: str, timeout: float, headers: dict[str, str]) -> tuple[bool, str]:
    """GET ``url``/health; returns (ok, reason when not ok)."""
    try:
        resp = await upstream.send("GET", url + "/health", None, headers, timeout=timeout)
    except UpstreamError as e:
        return False, str(e)
    if resp.status != 200:
        return False, f"/health answered HTTP {resp.status}"
    return True, ""


async def wait_healthy(upstream: Upstream, url: str, timeout: float, check_timeout: float,
                       headers: dict[str, str]) -> tuple[bool, str]:
    """Poll ``url``/health until it answers 200 or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        ok, reason = await is_healthy(upstream, url, check_timeout, headers)
        if ok or time.monotonic() >= deadline:
            return ok, reason
        await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


class HealthChecker:
    """Checks every worker each ``health_check_interval`` seconds, concurrently.

    A failed check counts like a failed request (``WorkerRegistry.record_failure``), so a
    worker that is down is removed after ``max_worker_retries`` checks in a row; a passing
    check resets that count (the circuit breaker still waits for a successful request).
    """

    def __init__(self, registry: WorkerRegistry, upstream: Upstream, headers: dict[str, str]) -> None:
        self.registry = registry
        self.upstream = upstream
        self.headers = headers
        self.config = registry.config

    async def check_all(self) -> None:
        workers = self.registry.workers()
        results = await asyncio.gather(
            *(is_healthy(self.upstream, w.url, self.config.health_check_timeout, self.headers) for w in workers)
        )
        for worker, (ok, reason) in zip(workers, results, strict=True):
            if worker.removed:
                continue
            worker.healthy = ok
            if ok:
                worker.consecutive_failures = 0
            else:
                log.warning("health check of %s failed: %s", worker.url, reason)
                self.registry.record_failure(worker, from_health_check=True)

    async def run(self) -> None:
        """Loop forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self.config.health_check_interval)
            await self.check_all()
