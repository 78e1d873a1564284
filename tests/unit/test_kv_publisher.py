"""The engine's KV-event publisher over real ZMQ sockets: nothing is hashed or sent while
nobody subscribes, and a subscriber that arrives later (the first one, or one that was away
meanwhile) still ends up with exactly what the radix cache holds, through the snapshot and the
gap that marks the time nobody listened."""

from __future__ import annotations

import time

import pytest
import zmq
from server_process import free_port

from radixfleet import kv_events
from radixfleet.engine.managers.io_struct import TokenizedGenerateReq
from radixfleet.engine.managers.kv_publisher import (
    HEARTBEAT_INTERVAL_S,
    KVEventPublisher,
    ReportArrivals,
)
from radixfleet.engine.managers.scheduler_io import QueueSchedulerIO
from radixfleet.engine.memory.allocator import TokenSlotAllocator
from radixfleet.engine.memory.radix_cache import RadixCache
from radixfleet.engine.sampling.params import SamplingParams
from radixfleet.kv_events import EventBatch, Snapshot
from radixfleet.router.kv_index import KVIndex

B = 4


def insert(alloc, cache, tokens) -> None:
    if alloc.available < len(tokens):
        cache.evict(len(tokens) - alloc.available)
    slots = alloc.alloc(len(tokens))
    alloc.free(slots[:cache.insert(tokens, slots)])


def expected_blocks(cache: RadixCache) -> set[int]:
    """The blocks of every cached path, hashed from scratch with the documented recipe."""
    out: set[int] = set()
    stack = [(n, []) for n in cache.root.children.values()]
    while stack:
        node, above = stack.pop()
        path = above + node.key
        out.update(kv_events.prefix_hashes(path, B))
        stack.extend((c, path) for c in node.children.values())
    return out


def subscriber(port: int, ctx: zmq.Context) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, kv_events.TOPIC)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def until(cond, publisher: KVEventPublisher, cache: RadixCache, timeout: float = 5.0) -> None:
    """Run the scheduler's tick until ``cond()`` (subscriptions travel asynchronously)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        publisher.tick(cache)
        time.sleep(0.01)


def received(sock: zmq.Socket) -> list[EventBatch]:
    out = []
    while sock.poll(200):
        out.append(EventBatch.decode(sock.recv_multipart()[1]))
    return out


def test_no_subscriber_no_hashing_then_late_and_returning_subscribers_resync():
    port, ctx = free_port(), zmq.Context()
    publisher = KVEventPublisher("127.0.0.1", port, B)
    alloc = TokenSlotAllocator(120, 1)
    cache = RadixCache(alloc, 1, events=publisher)
    try:
        # Nobody listens: the cache hashes nothing, and seq stands still.
        for t in range(6):
            insert(alloc, cache, [t] * 10 + [t + 1] * 7)
            publisher.tick(cache)
        assert not publisher.active and publisher.seq == 0
        assert all(not n.blocks for n in cache._nodes())

        # A subscriber arrives: the whole tree is hashed once; it loads a snapshot and follows.
        sub = subscriber(port, ctx)
        until(lambda: publisher.active, publisher, cache)
        index = KVIndex()
        index.add_worker("w")
        for batch in received(sub):
            assert index.on_message("w", batch) is None  # buffered until the snapshot
        assert index.on_snapshot("w", Snapshot.from_json(publisher.snapshot(cache))) is None
        assert index.workers["w"].blocks == expected_blocks(cache) != set()
        for t in range(6, 12):  # KV pressure: stores and removals
            insert(alloc, cache, [t] * 10 + [t + 1] * 7)
        reasons = [index.on_message("w", b) for b in received(sub)]
        assert reasons and set(reasons) == {None}
        assert index.workers["w"].blocks == expected_blocks(cache)

        # It goes away: hashing stops. Meanwhile the cache changes.
        sub.close()
        until(lambda: not publisher.active, publisher, cache)
        seq = publisher.seq
        for t in range(12, 16):
            insert(alloc, cache, [t] * 10 + [t + 1] * 7)
        assert publisher.seq == seq

        # It comes back holding its old state: the gap tells it to resync, and it is right again.
        sub = subscriber(port, ctx)
        until(lambda: publisher.active, publisher, cache)
        reasons = [index.on_message("w", b) for b in received(sub)]
        assert reasons == ["gap"]
        assert index.on_snapshot("w", Snapshot.from_json(publisher.snapshot(cache))) is None
        assert index.workers["w"].blocks == expected_blocks(cache)
        prompt = [15] * 10 + [16] * 7 + [99]
        assert index.matched_tokens(["w"], prompt)["w"] == 16
        sub.close()
    finally:
        publisher.close()
        ctx.destroy(linger=0)  # closes the subscriber too, also after a failure


def test_snapshot_asked_while_nobody_subscribes_is_complete():
    port = free_port()
    publisher = KVEventPublisher("127.0.0.1", port, B)
    alloc = TokenSlotAllocator(200, 1)
    cache = RadixCache(alloc, 1, events=publisher)
    try:
        for t in range(8):
            insert(alloc, cache, [1] * 9 + [t] * (5 + t))  # a shared 9-token prefix, split mid-block
        snap = Snapshot.from_json(publisher.snapshot(cache))
        assert not publisher.active and snap.seq == 0
        assert set(snap.blocks) == expected_blocks(cache) and len(snap.blocks) == len(set(snap.blocks))
    finally:
        publisher.close()


def test_heartbeats_go_out_while_the_scheduler_is_inside_a_long_step():
    """A step of several seconds (a long CPU prefill) must not make the engine look stale: the
    heartbeat thread keeps saying "still at seq N" while the scheduler thread never ticks, and
    the events of the step, when it publishes them, follow with N + 1 (no gap)."""
    port, ctx = free_port(), zmq.Context()
    publisher = KVEventPublisher("127.0.0.1", port, B)
    alloc = TokenSlotAllocator(120, 1)
    cache = RadixCache(alloc, 1, events=publisher)
    try:
        sub = subscriber(port, ctx)
        until(lambda: publisher.active, publisher, cache)
        received(sub)
        seq = publisher.seq
        step_s = 3.5  # no tick meanwhile, as inside one step
        deadline, beats = time.monotonic() + step_s, []
        while time.monotonic() < deadline:
            if sub.poll(100):
                beats.append((time.monotonic(), EventBatch.decode(sub.recv_multipart()[1])))
        assert len(beats) >= 3, beats
        assert all(b.seq == seq and not b.events for _, b in beats)
        gaps = [later - earlier for (earlier, _), (later, _) in zip(beats, beats[1:])]
        assert max(gaps) < 2 * HEARTBEAT_INTERVAL_S, gaps
        insert(alloc, cache, list(range(12)))  # the step ends and publishes what it stored
        after = received(sub)
        assert after and after[0].seq == seq + 1 and after[0].events
    finally:
        publisher.close()
        ctx.destroy(linger=0)


def test_queued_requests_reach_subscribers_and_snapshots():
    """A request the scheduler reports queued is published with its prompt's blocks (the full
    blocks but the last token), and settled when the scheduler says so; one queued while
    nobody listened is in the snapshot a late subscriber loads, and a router index fed this
    way counts the queued blocks only when asked for what the worker is about to hold."""
    port, ctx = free_port(), zmq.Context()
    publisher = KVEventPublisher("127.0.0.1", port, B)
    alloc = TokenSlotAllocator(120, 1)
    cache = RadixCache(alloc, 1, events=publisher)
    early, late = [5] * 12 + [6], [7] * 9
    try:
        publisher.queued("early", early)  # nobody listens: kept, not hashed, nothing sent
        assert publisher.seq == 0 and publisher._queued["early"][1] is None
        sub = subscriber(port, ctx)
        until(lambda: publisher.active, publisher, cache)
        index = KVIndex()
        index.add_worker("w")
        for batch in received(sub):
            index.on_message("w", batch)
        assert index.on_snapshot("w", Snapshot.from_json(publisher.snapshot(cache))) is None
        assert index.workers["w"].queued == {"early": kv_events.prefix_hashes(early[:-1], B)}
        publisher.queued("late", late)
        publisher.settled(["early", "unknown"])
        publisher.settled(["early"])  # settled twice (prefilled, then finished): sent once
        batches = received(sub)
        assert [b.events for b in batches] == [[kv_events.queued("late", kv_events.prefix_hashes(late[:-1], B))],
                                                [kv_events.settled(["early"])]]
        for batch in batches:
            assert index.on_message("w", batch) is None
        assert index.matched_tokens(["w"], late + [1], queued=True) == {"w": 8}
        assert index.matched_tokens(["w"], late + [1]) == {"w": 0}
        assert index.matched_tokens(["w"], early, queued=True) == {"w": 0}
        assert index.resident_tokens("w") == 8  # what it is about to hold counts for placement
        publisher.settled(["late"])
        for batch in received(sub):
            index.on_message("w", batch)
        assert index.matched_tokens(["w"], late + [1], queued=True) == {"w": 0} and not index.workers["w"].queued
    finally:
        publisher.close()
        ctx.destroy(linger=0)


def test_a_request_is_reported_queued_while_the_scheduler_is_inside_a_step():
    """The scheduler reads its requests only between steps (seconds apart during a long CPU
    prefill); ``ReportArrivals`` reports each one queued as it reaches the process, and hands
    it on unchanged. A failure reading the channel reaches the scheduler thread."""
    port, ctx = free_port(), zmq.Context()
    publisher = KVEventPublisher("127.0.0.1", port, B)
    cache = RadixCache(TokenSlotAllocator(120, 1), 1, events=publisher)
    inner = QueueSchedulerIO()
    io = ReportArrivals(inner, publisher, lambda m: isinstance(m, TokenizedGenerateReq))
    try:
        sub = subscriber(port, ctx)
        until(lambda: publisher.active, publisher, cache)
        received(sub)
        prompt = list(range(30))
        request = TokenizedGenerateReq("r", prompt, SamplingParams())
        inner.inbox.put(request)
        inner.inbox.put("control call")  # not a request: handed on, not reported
        start = time.monotonic()
        assert sub.poll(2000), "no queued event while the scheduler was not reading"
        batch = EventBatch.decode(sub.recv_multipart()[1])
        assert time.monotonic() - start < 1.0
        assert batch.events == [kv_events.queued("r", kv_events.prefix_hashes(prompt[:-1], B))]
        assert io.recv(1000) is request and io.recv(1000) == "control call" and io.recv(0) is None
        assert [b.events for b in received(sub) if b.events] == []

        def broken(timeout_ms):
            raise RuntimeError("channel broke")
        inner.recv = broken
        with pytest.raises(RuntimeError, match="channel broke"):
            io.recv(2000)
    finally:
        io.close()
        publisher.close()
        ctx.destroy(linger=0)
