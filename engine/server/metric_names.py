"""The engine's Prometheus metric families: the one source of truth.

The HTTP server registers exactly these (``engine/server/metrics.py``); Grafana dashboards and
their tests read this table. Names follow Prometheus conventions: base units, ``_total``
on counters, a ``model_name`` label on every family.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "radixfleet_engine_"


@dataclass(frozen=True)
class MetricFamily:
    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ("model_name",)


ENGINE_METRICS: tuple[MetricFamily, ...] = (
    MetricFamily(PREFIX + "prompt_tokens_total", "counter", "Prompt tokens processed."),
    MetricFamily(PREFIX + "generation_tokens_total", "counter", "Tokens generated."),
    MetricFamily(PREFIX + "cached_prompt_tokens_total", "counter", "Prompt tokens served from the radix cache."),
    MetricFamily(PREFIX + "requests_total", "counter", "Finished requests by finish reason.", ("model_name", "finish_reason")),
    MetricFamily(PREFIX + "time_to_first_token_seconds", "histogram", "Time from arrival to the first output token."),
    MetricFamily(PREFIX + "inter_token_latency_seconds", "histogram", "Time between consecutive output tokens."),
    MetricFamily(PREFIX + "e2e_request_latency_seconds", "histogram", "Time from arrival to the last output token."),
    MetricFamily(PREFIX + "queue_time_seconds", "histogram", "Time a request waited before its first prefill."),
    MetricFamily(PREFIX + "num_running_requests", "gauge", "Requests in the running batch."),
    MetricFamily(PREFIX + "num_queued_requests", "gauge", "Requests waiting to be scheduled."),
    MetricFamily(PREFIX + "kv_cache_usage_ratio", "gauge", "Fraction of KV-cache token slots in use."),
    MetricFamily(PREFIX + "cache_hit_ratio", "gauge", "Fraction of recent prompt tokens served from the radix cache."),
    MetricFamily(PREFIX + "generation_throughput_tokens_per_second", "gauge", "Recent decode throughput."),
)


def metric_names() -> set[str]:
    return {m.name for m in ENGINE_METRICS}
