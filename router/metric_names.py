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
    MetricFamily(PREFIX + "rejected_requests_total", "counter", "Requests the router refused itself, by reason (no_workers, queue_full, queue_timeout, rate_limited, client_cancelled, retries_exhausted).", ("route", "reason")),
    MetricFamily(PREFIX + "cache_aware_decisions_total", "counter", "cache_aware routing decisions: hit (prefix match), miss (smallest tree), imbalanced (least loaded).", ("decision",)),
    MetricFamily(PREFIX + "routing_decisions_total", "counter", "Routing decisions by the policy that made them (auto delegates to precise or cache_aware) and decision.", ("policy", "decision")),
    MetricFamily(PREFIX + "cached_tokens_predicted_total", "counter", "precise: prompt tokens the KV events said the chosen worker held, over requests whose worker reported cached_tokens.", ()),
    MetricFamily(PREFIX + "cached_tokens_reported_total", "counter", "precise: cached_tokens the workers reported for the same requests.", ()),
    MetricFamily(PREFIX + "cached_tokens_predictions_total", "counter", "precise predictions against the reported cached_tokens in whole KV-event blocks: exact, over or under.", ("outcome",)),
    MetricFamily(PREFIX + "kv_event_lag_seconds", "histogram", "Time from an engine publishing a KV-event message to the router receiving it.", ()),
    MetricFamily(PREFIX + "kv_event_resyncs_total", "counter", "KV-event snapshots loaded, by worker and reason (start, gap, restart, stale).", ("worker", "reason")),
    MetricFamily(PREFIX + "kv_events_in_sync", "gauge", "1 while a worker's KV events are live and recent (precise scores it by them), else 0.", ("worker",)),
    MetricFamily(PREFIX + "peer_routes_total", "counter", "Routing decisions announced by other router replicas, by outcome: applied (counted as queued on the worker), known (the worker already held or queued the prompt), invalid.", ("outcome",)),
    MetricFamily(PREFIX + "peer_route_lag_seconds", "histogram", "Time from a router replica announcing a routing decision to this replica receiving it.", ()),
    MetricFamily(PREFIX + "queue_depth", "gauge", "Requests waiting in the router's admission queue for a slot.", ()),
    MetricFamily(PREFIX + "queue_wait_seconds", "histogram", "Time requests waited in the admission queue, by outcome (admitted, timeout, cancelled).", ("outcome",)),
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
