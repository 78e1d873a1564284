"""The set of workers: membership, candidates for a request, and failure bookkeeping.

Invariant: a URL is in ``_workers`` exactly when the policy knows it (``add_worker`` /
``remove_worker`` are called together here). A removed worker's object lives on only in
the requests still using it; they finish and decrement its count, but it is never a
candidate again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .circuit_breaker import CircuitBreaker
from .config import RouterConfig
from .metrics import RouterMetrics
from .policies.base import Policy
from .worker import Worker, normalize_url

log = logging.getLogger(__name__)


class DuplicateWorker(ValueError):
    """add_worker for a URL that is already registered."""


class UnknownWorker(KeyError):
    """remove_worker for a URL that is not registered."""


class WorkerRegistry:
    """Workers by URL, in the order they were added."""

    def __init__(self, config: RouterConfig, policy: Policy) -> None:
        self.config = config
        self.policy = policy
        self.metrics: RouterMetrics | None = None  # attached by the app once built
        self.on_removed: Callable[[str], None] | None = None  # e.g. stop following its KV events
        self._workers: dict[str, Worker] = {}

    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def urls(self) -> list[str]:
        return list(self._workers)

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, url: str) -> bool:
        return url in self._workers

    def add(self, url: str) -> Worker:
        """Register ``url`` (normalized); raises InvalidWorkerURL or DuplicateWorker."""
        url = normalize_url(url)
        if url in self._workers:
            raise DuplicateWorker(f"Worker already exists: {url}")
        breaker = CircuitBreaker(self.config.circuit_breaker_failures, self.config.circuit_breaker_cooldown)
        worker = Worker(url, breaker)
        self._workers[url] = worker
        self.policy.add_worker(url)
        log.info("added worker %s (%d registered)", url, len(self._workers))
        return worker

    def remove(self, url: str, reason: str = "api") -> Worker:
        """Unregister ``url``; raises UnknownWorker. In-flight requests to it finish."""
        url = url.strip().rstrip("/")
        worker = self._workers.pop(url, None)
        if worker is None:
            raise UnknownWorker(f"Worker not found: {url}")
        worker.removed = True
        self.policy.remove_worker(url)
        if self.on_removed is not None:
            self.on_removed(url)
        if self.metrics is not None:
            self.metrics.removals.labels(reason).inc()
        log.info("removed worker %s (reason: %s, %d left)", url, reason, len(self._workers))
        return worker

    def candidates(self, exclude: set[str]) -> list[Worker]:
        """Workers that may take a request, skipping ``exclude`` (already tried).

        A worker whose last health check failed or whose circuit is open is skipped. When
        that leaves none, falls back to all untried workers: trying a worker that failed
        recently beats refusing the request outright.
        """
        workers = [w for w in self._workers.values() if w.url not in exclude]
        available = [w for w in workers if w.healthy and w.breaker.available()]
        return available or workers

    def record_success(self, worker: Worker) -> None:
        worker.consecutive_failures = 0
        worker.breaker.record_success()

    def record_failure(self, worker: Worker, from_health_check: bool = False) -> None:
        """Count a failure; the ``max_worker_retries``-th in a row removes the worker."""
        worker.consecutive_failures += 1
        if not from_health_check:
            worker.breaker.record_failure()
        if worker.consecutive_failures >= self.config.max_worker_retries and not worker.removed:
            log.warning("worker %s failed %d times in a row; removing it", worker.url, worker.consecutive_failures)
            self.remove(worker.url, reason="failures")
