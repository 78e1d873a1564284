"""Keeps the router's ``KVIndex`` fed: one ZMQ SUB socket per publishing worker, read on the
event loop as messages arrive and drained again right before every precise routing decision.

Each router replica subscribes to every worker itself, so N replicas hold the same index
and make the same choice for the same request (no state is shared between replicas).

A worker's event endpoint is given with it (``/add_worker?url=...&kv_events=tcp://h:p``,
which the operator sends) or found in its ``/get_server_info`` (``kv_events_port`` > 0 on
the worker URL's host). Per worker: subscribe, then fetch ``GET /kv_events/snapshot`` (the
messages that arrive meanwhile are buffered by the index and replayed after it); fetch again
whenever the index reports a gap or an engine restart, or when nothing (not even a
heartbeat) came for ``kv_events_stale_after`` seconds (a watchdog task checks). Failed
fetches are retried every second until the worker is removed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

import zmq

from radixfleet import kv_events
from radixfleet.kv_events import EventBatch, Snapshot

from .kv_index import KVIndex
from .metrics import RouterMetrics
from .upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)

_RETRY_S = 1.0  # first retry of a failed snapshot; doubled after each failure up to _RETRY_MAX_S
_RETRY_MAX_S = 30.0


def endpoint_from_info(url: str, info: dict) -> str | None:
    """``tcp://host:port`` of a worker whose server info says it publishes, else None."""
    port = info.get("kv_events_port") if isinstance(info, dict) else None
    if not isinstance(port, int) or port <= 0:
        return None
    host = url.split("://", 1)[1].rsplit(":", 1)[0]
    return f"tcp://{host}:{port}"


class KVSubscriber:
    def __init__(self, index: KVIndex, upstream: Upstream, headers: dict[str, str], metrics: RouterMetrics,
                 is_member: Callable[[str], bool]) -> None:
        self.index = index
        self.upstream = upstream
        self.headers = headers
        self.metrics = metrics
        self.is_member = is_member
        self.endpoints: dict[str, str] = {}
        self._socks: dict[str, zmq.Socket] = {}
        self._fetches: dict[str, asyncio.Task] = {}
        self._watchdog: asyncio.Task | None = None
        self._ctx = zmq.Context()
        # Called with the URL of each publishing worker before it is followed (the app loads
        # the tokenizer from the first one when it has none).
        self.on_publisher: Callable[[str], Awaitable[None]] | None = None

    def in_sync(self) -> dict[str, bool]:
        now = time.monotonic()
        return {url: self.index.in_sync(url, now) for url in self.endpoints}

    async def worker_added(self, url: str, endpoint: str | None) -> None:
        """Start following ``url``: at ``endpoint``, or where its server info says."""
        if endpoint is None:
            try:
                resp = await self.upstream.send("GET", url + "/get_server_info", None, self.headers)
                endpoint = endpoint_from_info(url, json.loads(resp.content)) if resp.status == 200 else None
            except (UpstreamError, ValueError) as e:
                log.warning("no server info from %s (%s): routing it without KV events", url, e)
                return
        if endpoint is None or not self.is_member(url) or url in self._socks:
            return
        if self.on_publisher is not None:
            await self.on_publisher(url)
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, kv_events.TOPIC)
        sock.connect(endpoint)
        self.endpoints[url], self._socks[url] = endpoint, sock
        self.index.add_worker(url)
        asyncio.get_running_loop().add_reader(sock.getsockopt(zmq.FD), self._drain_one, url)
        self._resync(url, "start", delay=0.05)  # let the subscription reach the publisher first
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch())
        log.info("following the KV events of %s at %s", url, endpoint)

    def worker_removed(self, url: str) -> None:
        sock = self._socks.pop(url, None)
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.getsockopt(zmq.FD))
            sock.close()
        fetch = self._fetches.pop(url, None)
        if fetch is not None:
            fetch.cancel()
        self.endpoints.pop(url, None)
        self.index.remove_worker(url)

    async def close(self) -> None:
        for url in list(self._socks):
            self.worker_removed(url)
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        self._ctx.term()

    def drain(self) -> None:
        """Apply every message already received, now (the policy calls this before scoring,
        so an event that reached the socket before the request is never missed)."""
        for url in list(self._socks):
            self._drain_one(url)

    def _drain_one(self, url: str) -> None:
        sock = self._socks.get(url)
        # The ZMQ FD is edge-triggered: read until the socket says nothing is left.
        while sock is not None and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                _, payload = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except ValueError:  # not two frames
                continue
            try:
                batch = EventBatch.decode(payload)
            except ValueError as e:
                log.warning("bad KV event message from %s: %s", self.endpoints.get(url), e)
                continue
            if batch.ts:
                self.metrics.event_lag.observe(max(0.0, time.time() - batch.ts))
            reason = self.index.on_message(url, batch)
            if reason:
                self._resync(url, reason)

    async def _watch(self) -> None:
        """Resync workers that went quiet (not even a heartbeat for ``stale_after`` seconds)."""
        while True:
            await asyncio.sleep(min(1.0, self.index.stale_after / 2))
            self.drain()
            now = time.monotonic()
            for url, w in list(self.index.workers.items()):
                if url in self._socks and now - w.last_message > self.index.stale_after:
                    self.index.mark_syncing(url)
                    self._resync(url, "stale")

    def _resync(self, url: str, reason: str, delay: float = 0.0) -> None:
        running = self._fetches.get(url)
        if running is None or running.done():
            self._fetches[url] = asyncio.create_task(self._snapshot(url, reason, delay))

    async def _snapshot(self, url: str, reason: str, delay: float = 0.0) -> None:
        """Load snapshots until the index is live again (or the worker is gone)."""
        await asyncio.sleep(delay)
        retry = _RETRY_S
        while url in self._socks:
            try:
                resp = await self.upstream.send("GET", url + "/kv_events/snapshot", None, self.headers)
                if resp.status != 200:  # 400: the engine does not publish (kv_events_port 0)
                    raise ValueError(f"HTTP {resp.status}: {resp.content[:200]!r}")
                snap = Snapshot.from_json(json.loads(resp.content))
            except (UpstreamError, ValueError) as e:
                (log.warning if retry == _RETRY_S else log.debug)(
                    "KV-event snapshot of %s failed (%s); retrying, routing it by the approximate tree meanwhile", url, e)
                await asyncio.sleep(retry)
                retry = min(2 * retry, _RETRY_MAX_S)
                continue
            self._drain_one(url)  # what came before the snapshot is buffered, not lost
            self.metrics.resyncs.labels(url, reason).inc()
            reason = self.index.on_snapshot(url, snap) or ""
            if not reason:
                return
