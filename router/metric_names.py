"""The router's Prometheus metric families: the one source of truth.

``router/metrics.py`` registers exactly these; Grafana dashboards and their tests read this
table. Names follow Prometheus conventions: base units (seconds, characters), ``_total`` on
counters, no colons. The ``worker`` label is the worker's URL; requests the router answers
itself (no worker chosen) carry ``worker="none"``.
"""

from __future__ import annotations

from radixfleet.engine.server.metric_names import MetricFamily  # one table shape for both catalogs

PREFIX = "radixfleet_router_"


ROUTER_METRICS: tuple[MetricFamily, ...] = (
    MetricFamily(PREFIX + "requests_total", "counter", "Requests answered, by route, worker and HTTP status.", ("route", "worker", "status")),
    MetricFamily(PREFIX + "retries_total", "counter", "Requests re-sent to another worker after a 5xx or connection error.", ("route",)),
    MetricFamily(PREFIX + "worker_failures_total", "counter", "Failed upstream attempts, by worker and reason (connect, disconnect, status_5xx, stream).", ("worker", "reason")),
    MetricFamily(PREFIX + "rejected_requests_total", "counter", "Requests the router refused itself, by reason (no_workers, queue_full, retries_exhausted).", ("route", "reason")),
    MetricFamily(PREFIX + "cache_aware_decisions_total", "counter", "cache_aware routing decisions: hit (prefix match), miss (smallest tree), imbalanced (least loaded).", ("decision",)),
    MetricFamily(PREFIX + "worker_removals_total", "counter", "Workers removed, by reason (api, failures).", ("reason",)),
    MetricFamily(PREFIX + "routing_latency_seconds", "histogram", "Time the policy took to choose a worker.", ("policy",)),
    MetricFamily(PREFIX + "request_duration_seconds", "histogram", "Time from arrival to the last byte of the answer.", ("route",)),
    MetricFamily(PREFIX + "in_flight_requests", "gauge", "Requests being served, by worker.", ("worker",)),
    MetricFamily(PREFIX + "worker_healthy", "gauge", "1 if the worker passed its last health check and its circuit is not open.", ("worker",)),
    MetricFamily(PREFIX + "circuit_breaker_state", "gauge", "Circuit state per worker: 0 closed, 1 half-open, 2 open.", ("worker",)),
    MetricFamily(PREFIX + "tree_size_characters", "gauge", "Characters in a worker's approximate radix tree (cache_aware).", ("worker",)),
    MetricFamily(PREFIX + "workers", "gauge", "Registered workers.", ()),
)


def metric_names() -> set[str]:
    return {m.name for m in ROUTER_METRICS}
