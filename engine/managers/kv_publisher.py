"""Publishes the radix cache's block changes over ZMQ PUB (``radixfleet/kv_events.py`` has the
hashing and the message format) and answers snapshot requests.

Lives in the scheduler process (TP rank 0 only), next to the radix cache whose operations
call ``publish``; everything runs on the scheduler's thread, so ``seq`` and the tree agree
when a snapshot is taken. Sends never block: when the send queue is full (a stalled
subscriber) the message is dropped, and subscribers see the gap in ``seq`` and resync from a
snapshot. With nobody subscribed ZMQ discards each message at once; what remains is hashing
the new blocks once per cache insert (``benchmarks/routing_quality.py --publisher-overhead``
measures it).
"""

from __future__ import annotations

import logging
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
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, _SEND_HWM)
        try:
            self._sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as e:
            self._sock.close()
            raise ValueError(f"cannot publish KV events on {host}:{port}: {e}") from None
        self._last_send = 0.0

    def publish(self, events: list[dict]) -> None:
        """Send one message of ``events``; it takes the next ``seq``."""
        self.seq += 1
        self._send(events)

    def tick(self) -> None:
        """Heartbeat (the current ``seq``, no events) when nothing was sent for a while."""
        if time.monotonic() - self._last_send >= HEARTBEAT_INTERVAL_S:
            self._send([])

    def snapshot(self, cache: RadixCache) -> dict:
        """Every resident block as of the last message sent."""
        return kv_events.Snapshot(self.engine_id, self.seq, self.block_size, self.seed,
                                  cache.resident_blocks()).to_json()

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()

    def _send(self, events: list[dict]) -> None:
        self._last_send = time.monotonic()
        payload = kv_events.EventBatch(self.engine_id, self.seq, time.time(), events).encode()
        try:
            self._sock.send_multipart([kv_events.TOPIC, payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("KV event subscribers are not keeping up: %d messages dropped", self.dropped)
