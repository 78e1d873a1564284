"""Router replicas tell each other where they send requests.

Every replica follows every worker's KV events (``kv_subscriber.py``), so N replicas hold the
same index. But a request reaches its worker's index entry only when the engine publishes
it as ``queued``, 10-20 ms after the replica that routed it chose; two requests on one new
context sent through different replicas within that window are each routed as if the other
did not exist: both land on one worker (the placement is a rendezvous hash every replica
computes alike), but the second one's prediction says nothing is cached while the engine
serves it from the first's prefill (measured: ``benchmarks/routing_quality.py``, README).

So each replica announces its decision, ``{router, worker, hashes}`` (the worker URL and the
prompt's block hashes), on a ZMQ PUB socket (``--peer-port``), and subscribes to the others
(``--peers``: ``tcp://host:port``, or ``dns://name:port`` for every address of a headless
Service, looked up again every ``_RESOLVE_S`` seconds). An announcement reaches the others in
about a millisecond; they count its blocks as queued on that worker (``KVIndex.peer_routed``)
until the engine's own ``queued`` event for the same prompt arrives, or ``ttl`` seconds pass.

Two replicas can still route requests sharing a new prompt within a millisecond or two of
each other, each before hearing the other. Both go to one worker (the placement is a
rendezvous hash), but each predicts nothing cached, and the engine serves whichever reaches
it second from the first's prefill. So, before sending (``agree``), a request that no worker
holds waits ``--peer-hold`` (3 ms; 0 turns the step off) while another replica is alive, for
announcements sent at the same moment; then every replica orders the announcements sharing
its prompt alike, by time and replica id (of two announcing the same blocks, the earlier
stands for both). A request with an earlier one on the same worker predicts the blocks they
share, and is sent once the engine has reported the earlier one queued (at most
``_ENGINE_WAIT_S``), so the engine sees them in that order. A replica's own decisions are
ordered the same way: otherwise a second request on the prompt, routed by the same replica
while the first is held (it sees the first, so it is not held itself), reached the engine
first. Each replica heartbeats every second, so a lone replica (or one whose peers are gone)
never waits.

Nothing else is shared: an announcement lost (a replica starting, a full queue) costs at most
one prediction, never a choice the events would have made differently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable

import zmq

from .config import RouterConfig
from .kv_index import KVIndex
from .metrics import RouterMetrics

log = logging.getLogger(__name__)

TOPIC = b"radixfleet.route"
_RESOLVE_S = 5.0  # how often dns:// peers are looked up again
_TTL_S = 2.0  # an announcement counts this long at most; the engine's queued event ends it in ~20 ms
_SEND_HWM = 10_000  # announcements buffered for a slow peer before new ones are dropped
_HEARTBEAT_S = 1.0
_PEER_ALIVE_S = 3.0  # a replica heard from within this is alive
_ENGINE_WAIT_S = 0.25  # the longest a request waits for the engine to report an earlier one queued
_POLL_S = 0.001


class PeerRoutes:
    """One replica's announcements out (``announce``) and its peers' in (``drain``)."""

    def __init__(self, config: RouterConfig, index: KVIndex, metrics: RouterMetrics, ttl: float = _TTL_S) -> None:
        self.index = index
        self.metrics = metrics
        self.ttl = ttl
        self.id = os.urandom(8).hex()
        self.peers = config.peers
        self.hold = config.peer_hold
        self.connected: set[str] = set()  # tcp:// endpoints the SUB socket is connected to
        self._resolved: dict[str, set[str]] = {}  # dns:// peer -> its tcp:// endpoints last looked up
        self.heard: dict[str, float] = {}  # other replica id -> monotonic time last heard
        # Applies every message already received, the engines' KV events too; set by the app.
        self.sync: Callable[[], None] = self.drain
        self._heartbeat: asyncio.Task | None = None
        self._ctx = zmq.Context()
        self._pub: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None
        self._resolver: asyncio.Task | None = None
        if config.peer_port:
            self._pub = self._ctx.socket(zmq.PUB)
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.setsockopt(zmq.SNDHWM, _SEND_HWM)
            try:
                self._pub.bind(f"tcp://{config.host}:{config.peer_port}")
            except zmq.ZMQError as e:
                self._ctx.destroy(linger=0)
                raise OSError(f"cannot listen for router peers on {config.host}:{config.peer_port}: {e}") from e

    async def start(self) -> None:
        """Heartbeat, and subscribe to the peers (on the running event loop)."""
        if self._pub is not None:
            self._heartbeat = asyncio.create_task(self._beat_forever())
        if not self.peers:
            return
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.IPV6, 1)  # a headless Service may list IPv6 pod addresses
        self._sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
        asyncio.get_running_loop().add_reader(self._sub.getsockopt(zmq.FD), self.drain)
        await self._connect_all()
        if any(p.startswith("dns://") for p in self.peers):
            self._resolver = asyncio.create_task(self._resolve_forever())

    async def close(self) -> None:
        tasks = [t for t in (self._resolver, self._heartbeat) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sub is not None:
            asyncio.get_running_loop().remove_reader(self._sub.getsockopt(zmq.FD))
        self._ctx.destroy(linger=0)

    # ---- out -------------------------------------------------------------------------------
    def announce(self, worker_url: str, hashes: list[int]) -> float | None:
        """Tell the peers this replica sent ``worker_url`` a prompt with these block hashes;
        the announcement's time (None if not announced)."""
        if self._pub is None or not hashes:
            return None
        ts = time.time()
        self._send({"router": self.id, "worker": worker_url, "hashes": hashes, "ts": ts})
        if self.hold:  # ordered like a peer's (``agree``): a later request here must not overtake it
            self.index.peer_routed(worker_url, hashes, self.ttl, ts=ts, router=self.id)
        return ts

    def _send(self, msg: dict) -> None:
        try:
            self._pub.send_multipart([TOPIC, json.dumps(msg).encode()], zmq.NOBLOCK)  # type: ignore[union-attr]
        except zmq.Again:  # a peer this far behind loses the message, not this request
            pass

    async def _beat_forever(self) -> None:
        while True:
            self._send({"router": self.id, "heartbeat": True})
            now = time.monotonic()  # forget replicas gone quiet (each restart is a new id)
            self.heard = {r: t for r, t in self.heard.items() if now - t <= _PEER_ALIVE_S}
            await asyncio.sleep(_HEARTBEAT_S)

    def alive(self) -> bool:
        """Whether another replica has been heard from lately."""
        now = time.monotonic()
        return any(now - t <= _PEER_ALIVE_S for t in self.heard.values())

    async def agree(self, worker_url: str, hashes: list[int], ts: float, placed: bool, key) -> None:
        """Before sending a request announced at ``ts`` (``hashes``: its prompt's blocks) to
        ``worker_url``: if ``placed`` (no worker held its prompt) and another replica is
        alive, wait ``hold`` seconds for announcements made at the same moment; then, if
        announcements before it share leading blocks with it on that worker, raise ``key``'s
        prediction to the blocks shared (lowering ``key.uncached`` alike) and wait until the
        engine has reported those requests queued, so that it serves them first."""
        if not self.hold:
            return
        if placed and self.alive():
            await asyncio.sleep(self.hold)
            self.sync()
        w = self.index.workers.get(worker_url)
        earlier = w.routed_before(hashes, ts, self.id) if w is not None else {}
        if not earlier:
            return
        shared = max(earlier.values()) * w.block_size  # type: ignore[union-attr]
        if key.predicted is not None and shared > key.predicted:
            key.uncached = max(0, key.uncached - (shared - key.predicted))
            key.predicted = shared
        deadline = time.monotonic() + _ENGINE_WAIT_S
        while any(last in w.routed for last in earlier) and time.monotonic() < deadline:  # type: ignore[union-attr]
            await asyncio.sleep(_POLL_S)
            self.sync()

    # ---- in --------------------------------------------------------------------------------
    def drain(self) -> None:
        """Apply every announcement already received (called as they arrive and before each
        precise decision), and expire the old ones."""
        sock = self._sub
        now = time.monotonic()
        while sock is not None and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            outcome = self._apply(frames, now)
            if outcome:
                self.metrics.peer_routes.labels(outcome).inc()
        self.index.expire_routed(now)

    def _apply(self, frames: list[bytes], now: float) -> str:
        try:
            msg = json.loads(frames[1])
            router = msg["router"]
            if router != self.id:
                self.heard[str(router)] = now
            if msg.get("heartbeat") is True:
                return ""
            worker, hashes = msg["worker"], msg["hashes"]
            if not (isinstance(worker, str) and isinstance(hashes, list) and all(type(h) is int for h in hashes)):
                raise ValueError("worker must be a string and hashes a list of integers")
        except (IndexError, KeyError, TypeError, ValueError) as e:
            log.warning("bad router-peer announcement: %s", e)
            return "invalid"
        if router == self.id:  # our own, heard back through a dns:// name that includes us
            return ""
        ts = msg.get("ts")
        if isinstance(ts, (int, float)):
            self.metrics.peer_route_lag.observe(max(0.0, time.time() - ts))
        else:
            ts = 0.0
        return "applied" if self.index.peer_routed(worker, hashes, self.ttl, now, ts, str(router)) else "known"

    async def _connect_all(self) -> None:
        want: set[str] = set()
        for peer in self.peers:
            scheme, _, rest = peer.partition("://")
            if scheme == "tcp":
                want.add(peer)
                continue
            host, _, port = rest.rpartition(":")
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
                self._resolved[peer] = {f"tcp://[{addr[0]}]:{port}" if family == socket.AF_INET6
                                        else f"tcp://{addr[0]}:{port}" for family, _, _, _, addr in infos}
            except OSError as e:  # keep the last known addresses until the name resolves again
                log.debug("router peers %s: %s", peer, e)
            want |= self._resolved.get(peer, set())
        assert self._sub is not None
        for endpoint in sorted(want - self.connected):
            self._sub.connect(endpoint)
            log.info("following the routing decisions of router peer %s", endpoint)
        for endpoint in sorted(self.connected - want):
            self._sub.disconnect(endpoint)
        self.connected = want

    async def _resolve_forever(self) -> None:
        while True:
            await asyncio.sleep(_RESOLVE_S)
            await self._connect_all()
