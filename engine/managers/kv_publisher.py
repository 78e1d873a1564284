"""Publishes the radix cache's block changes over ZMQ (``radixfleet/kv_events.py`` has the
hashing and the message format) and answers snapshot requests.

Lives in the scheduler process (TP rank 0 only), next to the radix cache whose operations
call ``publish``; publishing, subscriptions and snapshots run on the scheduler's thread, so
``seq`` and the tree agree when a snapshot is taken. The heartbeat (the current ``seq``, no
events, after ``HEARTBEAT_INTERVAL_S`` without a message) comes from a thread of its own, so
that it goes out during a step too: a prefill of a few thousand tokens on a loaded CPU takes
seconds, and a heartbeat sent only between steps let subscribers declare the engine stale
(and resync from a snapshot) while nothing had changed. The step cannot change the tree
without publishing, and every use of the socket and of ``seq`` holds one lock, so a heartbeat
never claims a ``seq`` that a batch of events has not gone out with. Sends never block: when
the send queue is full (a stalled subscriber) the message is dropped, and subscribers see
the gap in ``seq`` and resync from a snapshot.

Nobody subscribed, nothing done: the socket is an XPUB, which reports the first subscription
to a topic and the departure of its last subscriber. While nobody subscribes, ``active`` is
False and the radix cache neither hashes nor publishes (``radix_cache.py``), and ``seq``
stands still. When a subscriber arrives, the whole tree is hashed once (``hash_all``), ``seq``
skips one and a heartbeat goes out at once: a subscriber that held state from before (it
was disconnected meanwhile) sees the gap and resyncs; a new one starts from a snapshot
anyway. A snapshot asked for while nobody subscribes hashes the tree first, so it is always
right. ``benchmarks/routing_quality.py --publisher-overhead`` measures the cost.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import zmq

from radixfleet import kv_events
from radixfleet.engine.memory.radix_cache import RadixCache

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
_SEND_HWM = 10_000  # messages queued per subscriber before new ones are dropped


class KVEventPublisher:
    """One engine's event stream: ``engine_id`` (new at every start) and ``seq``."""

    def __init__(self, host: str, port: int, block_size: int, seed: int = kv_events.SEED) -> None:
        self.block_size = block_size
        self.seed = seed
        self.engine_id = uuid.uuid4().hex
        self.seq = 0
        self.dropped = 0
        self.active = False  # someone subscribes (the radix cache hashes and publishes only then)
        self.activations = 0
        self._topics: set[bytes] = set()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, _SEND_HWM)
        try:
            self._sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as e:
            self._sock.close()
            raise ValueError(f"cannot publish KV events on {host}:{port}: {e}") from None
        self._last_send = 0.0
        self._lock = threading.Lock()  # the socket, ``seq`` and ``_last_send``
        self._closed = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="kv-events-heartbeat", daemon=True)
        self._heartbeat.start()

    def publish(self, events: list[dict]) -> None:
        """Send one message of ``events``; it takes the next ``seq``."""
        with self._lock:
            self.seq += 1
            self._send(events)

    def tick(self, cache: RadixCache) -> None:
        """Take subscription changes (the scheduler calls this between steps)."""
        self._poll_subscriptions(cache)

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(HEARTBEAT_INTERVAL_S / 4):
            with self._lock:
                if self.active and time.monotonic() - self._last_send >= HEARTBEAT_INTERVAL_S:
                    self._send([])

    def snapshot(self, cache: RadixCache) -> dict:
        """Every resident block as of the last message sent."""
        self._poll_subscriptions(cache)  # a subscriber asking for it has usually subscribed by now
        if not self.active:
            cache.hash_all()
        return kv_events.Snapshot(self.engine_id, self.seq, self.block_size, self.seed,
                                  cache.resident_blocks()).to_json()

    def _poll_subscriptions(self, cache: RadixCache) -> None:
        # XPUB hands up b"\x01" + topic for a topic's first subscriber, b"\x00" + topic when
        # its last one leaves (unsubscribes or disconnects).
        with self._lock:
            while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                try:
                    msg = self._sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if msg[:1] == b"\x01":
                    self._topics.add(msg[1:])
                elif msg[:1] == b"\x00":
                    self._topics.discard(msg[1:])
        listening = bool(self._topics)
        if listening and not self.active:
            blocks = cache.hash_all()
            with self._lock:
                self.active = True
                self.activations += 1
                self.seq += 1  # the gap: what changed while nobody listened was never published
                self._send([])
            logger.info("KV events: a subscriber arrived; %d resident blocks hashed", blocks)
        elif self.active and not listening:
            self.active = False
            logger.info("KV events: no subscriber left; hashing stops")

    def close(self) -> None:
        self._closed.set()
        self._heartbeat.join()
        self._sock.close()
        self._ctx.term()

    def _send(self, events: list[dict]) -> None:
        """With ``_lock`` held."""
        self._last_send = time.monotonic()
        payload = kv_events.EventBatch(self.engine_id, self.seq, time.time(), events).encode()
        try:
            self._sock.send_multipart([kv_events.TOPIC, payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("KV event subscribers are not keeping up: %d messages dropped", self.dropped)
