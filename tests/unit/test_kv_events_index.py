"""KV events end to end in one process: the engine's radix cache publishes (through a
recording sink standing in for ZMQ), the router's ``KVIndex`` rebuilds what it holds, and
the index's answer is checked against the cache's own ``match_prefix``.

Covers the issue's list: store, remove and clear; resync after a gap; two workers holding
the same prefix; a late subscriber; and an engine restart."""

from __future__ import annotations

import random

import pytest

from radixfleet import kv_events
from radixfleet.engine.memory.allocator import TokenSlotAllocator
from radixfleet.engine.memory.radix_cache import RadixCache
from radixfleet.kv_events import EventBatch, Snapshot
from radixfleet.router.kv_index import KVIndex, block_hashes

B = 4


class Sink:
    """Numbers messages as ``KVEventPublisher`` does; keeps them for the test to deliver."""

    def __init__(self, engine: str = "e1", block_size: int = B) -> None:
        self.engine, self.block_size, self.seed, self.seq = engine, block_size, kv_events.SEED, 0
        self.active = True  # a subscriber listens (the cache hashes and publishes)
        self.sent: list[EventBatch] = []

    def publish(self, events: list[dict]) -> None:
        self.seq += 1
        self.sent.append(EventBatch(self.engine, self.seq, 0.0, events))

    def snapshot(self, cache: RadixCache) -> Snapshot:
        return Snapshot.from_json({"engine": self.engine, "seq": self.seq, "block_size": self.block_size,
                                   "seed": self.seed, "blocks": cache.resident_blocks()})


def engine(n: int = 256, engine_id: str = "e1") -> tuple[TokenSlotAllocator, RadixCache, Sink]:
    alloc, sink = TokenSlotAllocator(n, 1), Sink(engine_id)
    return alloc, RadixCache(alloc, 1, events=sink), sink


def insert(alloc, cache, tokens) -> None:
    if alloc.available < len(tokens):  # KV pressure: the engine evicts LRU leaves first
        cache.evict(len(tokens) - alloc.available)
    slots = alloc.alloc(len(tokens))
    prefix = cache.insert(tokens, slots)
    alloc.free(slots[:prefix])


def deliver(index: KVIndex, url: str, sink: Sink, start: int = 0) -> list[str | None]:
    return [index.on_message(url, b) for b in sink.sent[start:]]


def live_index(url: str, cache: RadixCache, sink: Sink) -> KVIndex:
    index = KVIndex()
    index.add_worker(url)
    assert index.on_snapshot(url, sink.snapshot(cache)) is None
    return index


def cached_blocks(cache: RadixCache, tokens: list[int]) -> int:
    """What the engine would reuse for this prompt, in whole blocks (its last token is always computed)."""
    return len(cache.match_prefix(tokens[:-1]).indices) // B * B


def test_hashes_are_chained_and_match_the_documented_recipe():
    tokens = list(range(10))
    h = kv_events.prefix_hashes(tokens, 4)
    assert len(h) == 2  # the 2-token tail is no block
    assert h[0] == kv_events.hash_block(kv_events.SEED, [0, 1, 2, 3])
    assert h[1] == kv_events.hash_block(h[0], [4, 5, 6, 7])
    # Same block, other history: another hash (a hash names the whole prefix).
    assert kv_events.prefix_hashes([9, 9, 9, 9, 4, 5, 6, 7], 4)[1] != h[1]
    with pytest.raises(ValueError, match="block_size"):
        kv_events.prefix_hashes(tokens, 0)


def test_store_remove_and_clear_follow_the_cache():
    alloc, cache, sink = engine(n=40)
    index = live_index("w", cache, sink)
    a, b = [1] * 13, [1] * 6 + [2] * 9  # share 6 tokens: one whole block, split mid-block
    insert(alloc, cache, a)
    insert(alloc, cache, b)
    assert deliver(index, "w", sink) == [None, None]
    for prompt in (a + [5], b + [5], [1] * 5 + [3] * 8):
        assert index.matched_tokens(["w"], prompt)["w"] == cached_blocks(cache, prompt) > 0
    # Eviction under KV pressure: the engine drops b's tail; the index follows.
    mark = len(sink.sent)
    insert(alloc, cache, [7] * 20)  # 13 + 9 + 20 slots > 39 usable: a's tail goes
    deliver(index, "w", sink, mark)
    assert any(ev["type"] == "removed" for batch in sink.sent[mark:] for ev in batch.events)
    for prompt in (a + [5], b + [5], [7] * 21):
        assert index.matched_tokens(["w"], prompt)["w"] == cached_blocks(cache, prompt)
    mark = len(sink.sent)
    assert cache.flush()
    deliver(index, "w", sink, mark)
    assert sink.sent[-1].events == [kv_events.cleared()]
    assert index.workers["w"].blocks == set()
    assert index.matched_tokens(["w"], a + [5])["w"] == 0


def test_random_operations_keep_index_equal_to_cache():
    rng = random.Random(0)
    alloc, cache, sink = engine(n=200)
    index = live_index("w", cache, sink)
    prompts = [[rng.randrange(3) for _ in range(rng.randrange(1, 40))] for _ in range(60)]
    for p in prompts:
        insert(alloc, cache, p)
        cache.match_prefix(p[: rng.randrange(len(p) + 1)])  # splits nodes, publishes nothing
    deliver(index, "w", sink)
    assert index.workers["w"].blocks == set(cache.resident_blocks())
    for p in prompts:
        assert index.matched_tokens(["w"], p + [9])["w"] == cached_blocks(cache, p + [9])


def test_gap_is_detected_and_snapshot_resyncs():
    alloc, cache, sink = engine()
    index = live_index("w", cache, sink)
    insert(alloc, cache, [1] * 8)
    insert(alloc, cache, [2] * 8)  # this message is lost
    insert(alloc, cache, [3] * 8)
    assert index.on_message("w", sink.sent[0]) is None
    assert index.on_message("w", sink.sent[2]) == "gap"
    assert not index.in_sync("w")
    assert index.matched_tokens(["w"], [1] * 9) == {}  # not trusted while syncing
    insert(alloc, cache, [4] * 8)  # arrives while the snapshot is being fetched
    snap = sink.snapshot(cache)
    insert(alloc, cache, [5] * 8)  # after the snapshot: replayed onto it
    index.on_message("w", sink.sent[3])
    index.on_message("w", sink.sent[4])
    assert index.on_snapshot("w", snap) is None
    assert index.in_sync("w") and index.workers["w"].resyncs == 1
    for t in (1, 2, 3, 4, 5):
        assert index.matched_tokens(["w"], [t] * 9)["w"] == 8


def test_heartbeat_past_our_seq_reveals_a_lost_last_message():
    alloc, cache, sink = engine()
    index = live_index("w", cache, sink)
    insert(alloc, cache, [1] * 8)  # lost
    heartbeat = EventBatch("e1", sink.seq, 0.0, [])
    assert index.on_message("w", heartbeat) == "gap"
    assert index.on_message("w", EventBatch("e1", 0, 0.0, [])) is None  # buffered meanwhile


def test_two_workers_holding_the_same_prefix():
    caches = {url: engine(engine_id=url) for url in ("a", "b", "c")}
    index = KVIndex()
    for url, (_, cache, sink) in caches.items():
        index.add_worker(url)
        index.on_snapshot(url, sink.snapshot(cache))
    shared = list(range(20))
    for url in ("a", "b"):
        alloc, cache, sink = caches[url]
        insert(alloc, cache, shared)
        deliver(index, url, sink)
    alloc, cache, sink = caches["a"]
    insert(alloc, cache, shared + [50] * 8)
    deliver(index, "a", sink, 1)
    assert index.matched_tokens(["a", "b", "c"], shared + [99]) == {"a": 20, "b": 20, "c": 0}
    assert index.matched_tokens(["a", "b", "c"], shared + [50] * 9) == {"a": 28, "b": 20, "c": 0}
    assert index.workers["a"].blocks & index.workers["b"].blocks == set(kv_events.prefix_hashes(shared, B))


def test_late_subscriber_starts_from_a_snapshot():
    alloc, cache, sink = engine()
    for t in range(5):
        insert(alloc, cache, [t] * 12)
    index = KVIndex()
    index.add_worker("w")
    # Subscribed now: it hears only what comes next, buffered until the snapshot arrives.
    snap = sink.snapshot(cache)
    insert(alloc, cache, [9] * 12)
    assert index.on_message("w", sink.sent[-1]) is None and not index.in_sync("w")
    assert index.on_snapshot("w", snap) is None
    for t in (0, 4, 9):
        assert index.matched_tokens(["w"], [t] * 13)["w"] == 12


def test_engine_restart_forces_a_resync_and_stale_worker_is_not_trusted():
    alloc, cache, sink = engine()
    index = live_index("w", cache, sink)
    insert(alloc, cache, [1] * 8)
    deliver(index, "w", sink)
    assert index.matched_tokens(["w"], [1] * 9)["w"] == 8
    alloc2, cache2, sink2 = engine(engine_id="e2")  # the same URL, a new engine process
    insert(alloc2, cache2, [2] * 8)
    assert index.on_message("w", sink2.sent[0]) == "restart"
    assert index.on_snapshot("w", sink2.snapshot(cache2)) is None
    assert index.matched_tokens(["w"], [1] * 9)["w"] == 0
    assert index.matched_tokens(["w"], [2] * 9)["w"] == 8
    index.workers["w"].last_message -= index.stale_after + 1  # nothing heard for a while
    assert not index.in_sync("w") and index.matched_tokens(["w"], [2] * 9) == {}


def test_events_off_cache_publishes_nothing_and_keeps_no_blocks():
    alloc = TokenSlotAllocator(64, 1)
    cache = RadixCache(alloc, 1)
    insert(alloc, cache, [1] * 20)
    assert cache.resident_blocks() == []


def test_matched_tokens_hashes_a_prompt_once_and_hands_the_hashes_back():
    """The precise policy's placement key reuses the block hashes ``matched_tokens``
    computed; a dict filled by one call serves the next unchanged."""
    index = KVIndex()
    for url in ("a", "b"):
        index.add_worker(url)
    index.on_snapshot("a", Snapshot("e", 0, 4, kv_events.SEED, kv_events.prefix_hashes(list(range(12)), 4)))
    index.on_snapshot("b", Snapshot("e", 0, 4, kv_events.SEED, []))
    prompt = list(range(20))
    hashes: dict[tuple[int, int], list[int]] = {}
    assert index.matched_tokens(["a", "b"], prompt, hashes) == {"a": 12, "b": 0}
    # Every full block but the one holding the last token: 19 tokens, 4 blocks.
    assert hashes == {(4, kv_events.SEED): kv_events.prefix_hashes(prompt[:19], 4)}
    assert block_hashes(prompt, 4, kv_events.SEED, hashes) is hashes[(4, kv_events.SEED)]
    # Given hashes are used as they are: those of another prompt match what that one holds.
    other = {(4, kv_events.SEED): kv_events.prefix_hashes(list(range(8)) + [99] * 8, 4)}
    assert index.matched_tokens(["a"], prompt, other) == {"a": 8}
