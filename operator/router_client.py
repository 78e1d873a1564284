"""The operator's view of one router process: its worker list, membership calls, and
per-worker in-flight requests (from its Prometheus metrics, for draining)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

# The router's per-worker in-flight gauge (router/metric_names.py) and its worker label.
INFLIGHT_METRIC = "radixfleet_router_in_flight_requests"
WORKER_LABEL = "worker"


class RouterError(Exception):
    """The router could not be reached or refused a membership call (transient)."""


class RouterClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 5.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url
        self._client = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout)

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            resp = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise RouterError(f"{method} {self.base_url}{path}: {e!r}") from e
        if resp.status_code >= 400:
            raise RouterError(f"{method} {self.base_url}{path}: HTTP {resp.status_code} {resp.text[:200]}")
        return resp

    async def list_workers(self) -> set[str]:
        resp = await self._call("GET", "/list_workers")
        return set(resp.json().get("urls") or [])

    async def add_worker(self, url: str, kv_events: str | None = None) -> None:
        """Register ``url``; ``kv_events`` (tcp://host:port) is where it publishes KV events."""
        await self._call("POST", "/add_worker", params={"url": url, **({"kv_events": kv_events} if kv_events else {})})

    async def remove_worker(self, url: str) -> None:
        await self._call("POST", "/remove_worker", params={"url": url})

    async def inflight(self) -> dict[str, float]:
        """In-flight requests per worker URL, as the router counts them."""
        text = (await self._call("GET", "/metrics")).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == INFLIGHT_METRIC and WORKER_LABEL in sample.labels:
                    out[sample.labels[WORKER_LABEL]] = out.get(sample.labels[WORKER_LABEL], 0.0) + sample.value
        return out
