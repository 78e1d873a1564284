"""The HTTP server's Prometheus metrics: exactly the families of ``engine/server/metric_names.py``.

Request-side values (token counts, finish reasons, latencies) are observed by a
``TokenizerManager`` listener in its receiver thread (prometheus-client objects are
thread-safe). Scheduler-side gauges are refreshed from a ``GetInternalStateReq`` call at
scrape time, over the engine's existing IPC.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.registry import REGISTRY

from radixfleet.engine.server.metric_names import ENGINE_METRICS, PREFIX

try:  # `_created` series only add noise to every counter and histogram
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
except ImportError:  # pragma: no cover - older prometheus-client
    pass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets in seconds, wide enough for a CPU (slow) and a GPU (fast) engine.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_BUCKETS = {
    PREFIX + "time_to_first_token_seconds": _LATENCY_BUCKETS,
    PREFIX + "inter_token_latency_seconds": _ITL_BUCKETS,
    PREFIX + "e2e_request_latency_seconds": _LATENCY_BUCKETS + (300.0, 600.0),
    PREFIX + "queue_time_seconds": _LATENCY_BUCKETS,
}
# Gauge family -> key of the scheduler's internal_state().
_GAUGE_SOURCES = {
    PREFIX + "num_running_requests": "num_running_requests",
    PREFIX + "num_queued_requests": "num_queued_requests",
    PREFIX + "kv_cache_usage_ratio": "kv_cache_usage_ratio",
    PREFIX + "cache_hit_ratio": "cache_hit_ratio",
    PREFIX + "generation_throughput_tokens_per_second": "generation_throughput",
}
# Requests whose rid starts with this (``/health_generate``) are not counted.
UNMETERED_RID_PREFIX = "HEALTH_CHECK_"

_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


class EngineMetrics:
    """One registry holding the engine's families, all labelled with ``model_name``."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        assert self.registry is not REGISTRY, "use a private registry: one per server"
        self.families: dict[str, Any] = {}
        for fam in ENGINE_METRICS:
            kwargs: dict[str, Any] = {"registry": self.registry, "labelnames": fam.labels}
            if fam.kind == "histogram":
                kwargs["buckets"] = _BUCKETS.get(fam.name, _LATENCY_BUCKETS)
            self.families[fam.name] = _KINDS[fam.kind](fam.name, fam.help, **kwargs)
            if fam.labels == ("model_name",):  # export zeros before the first event
                self.families[fam.name].labels(model_name=model_name)
        missing = set(_GAUGE_SOURCES) - set(self.families)
        assert not missing, f"gauges without a family in metric_names: {missing}"
        # Per-request time of the last output token, for inter-token latency.
        self._last_token: dict[str, float] = {}
        self._lock = threading.Lock()

    def _m(self, suffix: str, **labels: str) -> Any:
        return self.families[PREFIX + suffix].labels(model_name=self.model_name, **labels)

    # ---- TokenizerManager listener (receiver thread) -------------------------------------
    def on_output(self, state: Any, new_ids: list[int], finished: dict | None, meta: dict) -> None:
        rid = state.rid
        if rid.startswith(UNMETERED_RID_PREFIX):
            return
        now = time.monotonic()
        if new_ids:
            self._m("generation_tokens_total").inc(len(new_ids))
            with self._lock:
                last = self._last_token.get(rid)
                self._last_token[rid] = now
            if last is None:
                self._m("time_to_first_token_seconds").observe(max(now - state.arrival, 0.0))
                extra = len(new_ids) - 1  # tokens that came together with the first one
                interval = 0.0
            else:
                extra = len(new_ids)
                interval = (now - last) / len(new_ids)
            itl = self._m("inter_token_latency_seconds")
            for _ in range(extra):
                itl.observe(interval)
        if finished is None:
            return
        with self._lock:
            self._last_token.pop(rid, None)
        self._m("requests_total", finish_reason=str(finished.get("type", "unknown"))).inc()
        self._m("prompt_tokens_total").inc(meta.get("prompt_tokens", 0))
        self._m("cached_prompt_tokens_total").inc(max(meta.get("cached_tokens", 0), 0))
        if "e2e_latency" in meta:
            self._m("e2e_request_latency_seconds").observe(meta["e2e_latency"])
        if "queue_time" in meta:
            self._m("queue_time_seconds").observe(meta["queue_time"])

    # ---- scrape ----------------------------------------------------------------------------
    def set_internal_state(self, state: dict) -> None:
        for family, key in _GAUGE_SOURCES.items():
            if key in state:
                self.families[family].labels(model_name=self.model_name).set(float(state[key]))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
