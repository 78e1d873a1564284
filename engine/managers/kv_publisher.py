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

Requests too: the scheduler reports each request it receives (``queued``) and each one that
was prefilled or ended (``settled``); the publisher keeps the queued ones (their token ids,
hashed only while someone subscribes or a snapshot asks) so that a snapshot lists them and a
subscriber that arrives late knows what is about to be held.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

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
        # rid -> [prompt token ids, their block hashes or None until hashed]
        self._queued: dict[str, list] = {}
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

    def queued(self, rid: str, token_ids: Sequence[int]) -> None:
        """A request that has just reached the scheduler process; its prompt will be held once
        prefilled. Any thread (``ReportArrivals``' reader)."""
        with self._lock:
            entry = self._queued[rid] = [token_ids, None]
            if self.active:
                self.seq += 1
                self._send([kv_events.queued(rid, self._hashes(entry))])

    def settled(self, rids: Iterable[str]) -> None:
        """Requests prefilled (their blocks were published as stored) or ended; unknown or
        already settled ones are skipped."""
        rids = list(rids)
        if not rids:
            return
        with self._lock:
            gone = [rid for rid in rids if self._queued.pop(rid, None) is not None]
            if gone and self.active:
                self.seq += 1
                self._send([kv_events.settled(gone)])

    def _hashes(self, entry: list) -> list[int]:
        if entry[1] is None:
            entry[1] = kv_events.prompt_hashes(entry[0], self.block_size, self.seed)
        return entry[1]

    def tick(self, cache: RadixCache) -> None:
        """Take subscription changes (the scheduler calls this between steps)."""
        self._poll_subscriptions(cache)

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(HEARTBEAT_INTERVAL_S / 4):
            with self._lock:
                if self.active and time.monotonic() - self._last_send >= HEARTBEAT_INTERVAL_S:
                    self._send([])

    def snapshot(self, cache: RadixCache) -> dict:
        """Every resident block and queued request as of the last message sent."""
        self._poll_subscriptions(cache)  # a subscriber asking for it has usually subscribed by now
        if not self.active:
            cache.hash_all()
        with self._lock:  # the arrivals thread adds queued requests, each with a seq
            seq, queued = self.seq, {rid: self._hashes(entry) for rid, entry in self._queued.items()}
        return kv_events.Snapshot(self.engine_id, seq, self.block_size, self.seed,
                                  cache.resident_blocks(), queued).to_json()

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


class ReportArrivals:
    """The scheduler's channels (``scheduler_io.SchedulerIO``) with a reader thread in front
    of ``recv``: each generate request is reported queued (``KVEventPublisher.queued``) as it
    reaches the scheduler process, then handed to the scheduler when it next reads. The
    scheduler reads only between steps, and one CPU prefill step takes seconds under load:
    reported then, a request would tell the routers nothing they did not learn from its
    ``stored`` blocks soon after. Only this thread reads the inner channel."""

    def __init__(self, io, publisher: KVEventPublisher, is_request: Callable[[object], bool]) -> None:
        self._io = io
        self._publisher = publisher
        self._is_request = is_request
        self._inbox: queue.Queue = queue.Queue()
        self.received = 0  # messages handed on to the scheduler so far
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="kv-events-arrivals", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                msg = self._io.recv(100)
                if msg is not None and self._is_request(msg):
                    self._publisher.queued(msg.rid, msg.input_ids)
            except BaseException as e:  # handed to the scheduler thread, which raises it
                self._inbox.put(_ReaderFailed(e))
                return
            if msg is not None:
                self._inbox.put(msg)
                self.received += 1

    def recv(self, timeout_ms: int):
        try:
            msg = self._inbox.get(timeout=timeout_ms / 1000) if timeout_ms else self._inbox.get_nowait()
        except queue.Empty:
            return None
        if isinstance(msg, _ReaderFailed):
            raise msg.error
        return msg

    def to_detokenizer(self, msg) -> None:
        self._io.to_detokenizer(msg)

    def to_tokenizer(self, msg) -> None:
        self._io.to_tokenizer(msg)

    def close(self) -> None:
        self._closed.set()
        self._reader.join()


class _ReaderFailed:
    def __init__(self, error: BaseException) -> None:
        self.error = error
