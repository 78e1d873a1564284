"""Replica recommendations from engine load, with hysteresis.

Same rule as the HorizontalPodAutoscaler: desired = ceil(current * observed / target),
inside a 10% tolerance band, clamped to [min, max]. Scale-up is applied at once;
scale-down only to the highest recommendation seen during the stabilization window,
so a short lull never removes replicas that the next burst needs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from radixfleet.operator.spec import AutoscalingSpec

log = logging.getLogger(__name__)
TOLERANCE = 0.1
# Engine gauges per autoscaling metric (names from engine/server/metric_names.py; a test checks them).
METRIC_SOURCES: dict[str, str] = {
    "queuedRequests": "radixfleet_engine_num_queued_requests",
    "kvCacheUsage": "radixfleet_engine_kv_cache_usage_ratio",
}


@dataclass
class ScaleHistory:
    """Recent (time, recommendation) pairs of one InferenceService."""

    entries: list[tuple[float, int]] = field(default_factory=list)


def recommend(current: int, observed: float, spec: AutoscalingSpec) -> int:
    """The raw recommendation for `observed` (the per-replica average of the metric)."""
    if current == 0:
        want = 1 if observed > 0 else spec.min_replicas
    elif abs(observed / spec.target - 1.0) <= TOLERANCE:
        want = current
    else:
        want = math.ceil(current * observed / spec.target)
    return max(spec.min_replicas, min(spec.max_replicas, want))


def stabilize(history: ScaleHistory, current: int, recommendation: int, now: float, window: float) -> int:
    """Apply scale-down hysteresis; records `recommendation` in `history`."""
    if not history.entries:
        history.entries.append((now, current))  # a fresh operator has seen no lull yet
    history.entries = [(t, r) for t, r in history.entries if now - t < window] + [(now, recommendation)]
    if recommendation >= current:
        return recommendation
    return min(current, max(r for _, r in history.entries))


async def observe(worker_urls: Iterable[str], metric: str, api_key: str | None = None, timeout: float = 3.0) -> float | None:
    """Average of the metric's gauge over the workers that answered, or None if none did.
    With `api_key` (the service's apiKeySecret) it is sent as a bearer token: keyed engines
    answer /metrics with 401 otherwise, and a refusal counts as no answer."""
    name = METRIC_SOURCES[metric]
    values: list[float] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout, headers=headers) as client:
        for url in worker_urls:
            try:
                resp = await client.get(f"{url}/metrics")
            except httpx.HTTPError:
                continue
            if resp.status_code != 200:
                log.warning("autoscaler: %s/metrics answered HTTP %d", url, resp.status_code)
                continue
            total = [s.value for f in text_string_to_metric_families(resp.text) for s in f.samples if s.name == name]
            if total:
                values.append(sum(total))
    return sum(values) / len(values) if values else None
