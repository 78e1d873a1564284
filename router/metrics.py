"""Registers the families of ``metric_names.ROUTER_METRICS`` in the router's own registry.

Counters and histograms are updated on the request path. Per-worker gauges are not: a
collector reads them from the worker registry at scrape time, so a removed worker's series
disappear with it and the hot path does no gauge bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .metric_names import PREFIX, ROUTER_METRICS, MetricFamily
from .worker import Worker

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Routing takes microseconds; requests take milliseconds to minutes.
_BUCKETS = {
    PREFIX + "routing_latency_seconds": (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1),
    PREFIX + "kv_event_lag_seconds": (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
    PREFIX + "peer_route_lag_seconds": (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
    PREFIX + "queue_wait_seconds": (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    PREFIX + "request_duration_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
}

_SCRAPE_GAUGES = {
    PREFIX + "in_flight_requests",
    PREFIX + "worker_healthy",
    PREFIX + "circuit_breaker_state",
    PREFIX + "tree_size_characters",
    PREFIX + "workers",
    PREFIX + "kv_events_in_sync",
    PREFIX + "queue_depth",
}


class _WorkerGauges(Collector):
    def __init__(self, workers: Callable[[], list[Worker]], tree_sizes: Callable[[], dict[str, int]],
                 in_sync: Callable[[], dict[str, bool]], queue_depth: Callable[[], int]) -> None:
        self._workers = workers
        self._tree_sizes = tree_sizes
        self._in_sync = in_sync
        self._queue_depth = queue_depth
        self._families = {m.name: m for m in ROUTER_METRICS if m.name in _SCRAPE_GAUGES}
        assert set(self._families) == _SCRAPE_GAUGES, "scrape-time gauges must be in the catalog"

    def _family(self, name: str) -> GaugeMetricFamily:
        m = self._families[PREFIX + name]
        return GaugeMetricFamily(m.name, m.help, labels=m.labels)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        workers = self._workers()
        in_flight, healthy, breaker = (self._family(n) for n in ("in_flight_requests", "worker_healthy", "circuit_breaker_state"))
        for w in workers:
            state = w.breaker.state
            in_flight.add_metric([w.url], w.in_flight)
            healthy.add_metric([w.url], 1.0 if w.healthy and state != state.OPEN else 0.0)
            breaker.add_metric([w.url], int(state))
        trees = self._family("tree_size_characters")
        for url, size in self._tree_sizes().items():
            trees.add_metric([url], size)
        count = self._family("workers")
        count.add_metric([], len(workers))
        sync = self._family("kv_events_in_sync")
        for url, ok in self._in_sync().items():
            sync.add_metric([url], 1.0 if ok else 0.0)
        depth = self._family("queue_depth")
        depth.add_metric([], self._queue_depth())
        return [in_flight, healthy, breaker, trees, count, sync, depth]


class RouterMetrics:
    """The router's metrics, in a registry of its own (never the global default)."""

    def __init__(self, policy_name: str, workers: Callable[[], list[Worker]], tree_sizes: Callable[[], dict[str, int]],
                 in_sync: Callable[[], dict[str, bool]] = dict, queue_depth: Callable[[], int] = int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        made = {m.name: self._make(m) for m in ROUTER_METRICS if m.name not in _SCRAPE_GAUGES}
        self.requests: Counter = made[PREFIX + "requests_total"]
        self.retries: Counter = made[PREFIX + "retries_total"]
        self.worker_failures: Counter = made[PREFIX + "worker_failures_total"]
        self.rejected: Counter = made[PREFIX + "rejected_requests_total"]
        self.decisions: Counter = made[PREFIX + "cache_aware_decisions_total"]
        self.removals: Counter = made[PREFIX + "worker_removals_total"]
        self.decisions_by_policy: Counter = made[PREFIX + "routing_decisions_total"]
        self.predicted_cached: Counter = made[PREFIX + "cached_tokens_predicted_total"]
        self.reported_cached: Counter = made[PREFIX + "cached_tokens_reported_total"]
        self.predictions: Counter = made[PREFIX + "cached_tokens_predictions_total"]
        self.event_lag: Histogram = made[PREFIX + "kv_event_lag_seconds"]
        self.resyncs: Counter = made[PREFIX + "kv_event_resyncs_total"]
        self.queue_wait: Histogram = made[PREFIX + "queue_wait_seconds"]
        self.peer_routes: Counter = made[PREFIX + "peer_routes_total"]
        self.peer_route_lag: Histogram = made[PREFIX + "peer_route_lag_seconds"]
        # Series that exist from the start (at 0), so dashboards show rates before the first event.
        for outcome in ("admitted", "timeout", "cancelled"):
            self.queue_wait.labels(outcome)
        for outcome in ("exact", "over", "under"):
            self.predictions.labels(outcome)
        for outcome in ("applied", "known", "invalid"):
            self.peer_routes.labels(outcome)
        for decision in ("hit", "miss", "imbalanced"):
            self.decisions.labels(decision)
        self.routing_latency: Histogram = made[PREFIX + "routing_latency_seconds"]  # by the deciding policy
        self.request_duration: Histogram = made[PREFIX + "request_duration_seconds"]
        self.registry.register(_WorkerGauges(workers, tree_sizes, in_sync, queue_depth))

    def _make(self, m: MetricFamily) -> Counter | Histogram:
        if m.kind == "counter":
            return Counter(m.name, m.help, m.labels, registry=self.registry)
        assert m.kind == "histogram", f"{m.name}: unexpected kind {m.kind}"
        return Histogram(m.name, m.help, m.labels, buckets=_BUCKETS[m.name], registry=self.registry)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
