"""Concurrent requests on a new prefix compute it once, decided in-process over a fake model
runner with the real allocator, request table and radix cache (tests/fake_runner.py).

A prompt goes into the radix cache when its prefill step is launched (each chunk of a
chunked one), not when its request ends (engine/managers/kv_manager.py ``cache_computed``);
a waiting request that shares a long new prefix with one admitted to the same batch waits
one step for it (engine/managers/prefill.py). What a user sees: the later requests report
the shared prefix as cached, their outputs are the reference's, and every slot comes back.
Between steps, ``check_slots`` verifies that no request or tree node holds a freed slot and
that no slot has two owners."""

from __future__ import annotations

import pytest
import zmq
from fake_runner import SchedulerHarness, reference
from server_process import free_port

from radixfleet import kv_events
from radixfleet.engine.managers.kv_manager import KVManager
from radixfleet.engine.managers.prefill import IN_BATCH_SHARE_MIN, PrefillAdder
from radixfleet.engine.managers.request import Req
from radixfleet.engine.memory.allocator import TokenSlotAllocator
from radixfleet.engine.memory.radix_cache import RadixCache
from radixfleet.engine.memory.req_table import ReqToTokenTable
from radixfleet.engine.sampling.logprobs import ReqOutputs
from radixfleet.engine.sampling.params import SamplingParams

MODES = pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
PAGES = pytest.mark.parametrize("page_size", [1, 4], ids=["page1", "page4"])
SHARED = [17 + (7 * i) % 90 for i in range(40)]  # a new 40-token context


def ask(i: int) -> list[int]:
    return SHARED + [20 + i, 60 + i, 95 - i]


def check_slots(h: SchedulerHarness) -> None:
    """Every slot a request's row or a tree node names is allocated, and has one owner: the
    tree (a request's first ``len(prefix_slots)``) or the request (the rest)."""
    s, alloc = h.scheduler, h.runner.allocator
    page = alloc.page_size
    free = {p * page + i for p in alloc._free_pages for i in range(page)}
    tree = [int(x) for n in s.kv.cache._nodes() for x in n.value]
    assert len(tree) == len(set(tree)) and not free & set(tree)
    owned = set(tree)
    for r in s.running + ([s.chunked] if s.chunked else []):
        if r.finished_reason is not None or r.row is None:
            continue
        row = h.runner.req_table.read(r.row, r.kv_len).tolist()
        assert row[:len(r.prefix_slots)] == r.prefix_slots.tolist()
        assert not free & set(row), f"{r.rid} reads a freed slot"
        own = set(row[len(r.prefix_slots):])
        assert not owned & own, f"{r.rid} shares a slot it owns"
        owned |= own


def run_checked(h: SchedulerHarness) -> None:
    h.step()
    while h.scheduler._busy():
        check_slots(h)
        h.step()


@MODES
@PAGES
def test_requests_sharing_a_new_prefix_sent_at_once_compute_it_once(overlap, page_size):
    h = SchedulerHarness(overlap=overlap, page_size=page_size)
    for i in range(4):
        h.submit(f"q{i}", ask(i), max_new_tokens=6, ignore_eos=True)
    run_checked(h)
    # The first computes the context; the others wait one step and find it cached.
    assert [launch.rids for launch in h.launches("extend")] == [("q0",), ("q1", "q2", "q3")]
    for i in range(4):
        assert h.tokens(f"q{i}") == reference(ask(i), 6, stop_ids=())
    assert {rid: h.sent(rid)[-1].cached_tokens for rid in ("q0", "q1", "q2", "q3")} == \
        {"q0": 0, "q1": 40, "q2": 40, "q3": 40}
    h.assert_all_free()


@MODES
def test_a_request_arriving_while_another_decodes_reuses_its_prompt(overlap):
    h = SchedulerHarness(overlap=overlap)
    h.submit("long", ask(0), stream=True, max_new_tokens=30, ignore_eos=True)
    for _ in range(4):
        h.step()
    assert h.tokens("long") and h.finish("long") is None  # still decoding
    h.submit("late", ask(1), max_new_tokens=5, ignore_eos=True)
    run_checked(h)
    assert h.sent("late")[-1].cached_tokens == len(SHARED)
    assert h.tokens("late") == reference(ask(1), 5, stop_ids=())
    assert h.tokens("long") == reference(ask(0), 30, stop_ids=())
    h.assert_all_free()


@MODES
@PAGES
@pytest.mark.parametrize("repoint", [True, False], ids=["repoint", "tp"])
def test_a_chunked_prefill_is_cached_chunk_by_chunk(overlap, page_size, repoint):
    # 36 tokens in chunks of 8: the fifth step computes the last 4 and leaves room for 4
    # tokens of a request on the same prompt, which arrived meanwhile. With tensor
    # parallelism (no repointing) that request keeps its copy of them until it ends.
    h = SchedulerHarness(overlap=overlap, chunked_prefill_size=8, page_size=page_size)
    h.scheduler.kv.repoint_rows = repoint
    prompt = SHARED[:36]
    h.submit("chunked", prompt, max_new_tokens=8, ignore_eos=True)
    h.step()
    h.step()
    assert h.scheduler.kv.cache.total_size == 16  # two chunks, before the request ends
    h.submit("same", prompt + [33, 44], max_new_tokens=8, ignore_eos=True)
    run_checked(h)
    # It started with the 32 tokens the first four chunks had cached and computed the last
    # 4 beside "chunked" (too few to wait for); its copy of them went back to the pool.
    assert h.sent("same")[-1].cached_tokens == 32
    assert ("chunked", "same") in [launch.rids for launch in h.launches("extend")]
    assert h.tokens("chunked") == reference(prompt, 8, stop_ids=())
    assert h.tokens("same") == reference(prompt + [33, 44], 8, stop_ids=())
    h.assert_all_free()


@MODES
@PAGES
def test_retraction_and_eviction_with_shared_prefixes_stay_exact_and_leak_nothing(overlap, page_size):
    # 8 requests of 40 + 3 prompt tokens and 24 outputs; 96 slots: the context is cached
    # once, the requests' own tokens do not all fit, so the newest are retracted, and
    # tree leaves are evicted to make room.
    h = SchedulerHarness(overlap=overlap, max_total_tokens=96, page_size=page_size)
    for i in range(8):
        h.submit(f"q{i}", ask(i), stream=True, max_new_tokens=24, ignore_eos=True)
    h.submit("other", list(range(70, 100)), max_new_tokens=24, ignore_eos=True)
    run_checked(h)
    assert h.scheduler.stats["retractions"] > 0
    for i in range(8):
        assert h.tokens(f"q{i}") == reference(ask(i), 24, stop_ids=())
    assert h.tokens("other") == reference(list(range(70, 100)), 24, stop_ids=())
    assert max(h.sent(f"q{i}")[-1].cached_tokens for i in range(8)) >= 40
    h.assert_all_free()


@MODES
def test_abort_after_prefill_caching_frees_everything(overlap):
    h = SchedulerHarness(overlap=overlap, chunked_prefill_size=8)
    h.submit("a", ask(0), max_new_tokens=30, ignore_eos=True)
    h.submit("b", ask(1), max_new_tokens=30, ignore_eos=True)
    for _ in range(8):  # "a" chunked, then "b" from the cache, both decoding
        h.step()
        check_slots(h)
    h.scheduler._abort("a")
    h.step()
    h.scheduler._abort("b")
    h.run()
    assert h.finish("a")["type"] == h.finish("b")["type"] == "abort"
    h.assert_all_free()


def test_the_prompt_is_published_as_stored_at_its_prefill():
    """KV events: a router learns of a prompt's blocks while its request still decodes, and
    before that, of the request itself: queued (its prompt's blocks but the last token's)
    when it arrives, settled once its blocks are stored."""
    port, ctx = free_port(), zmq.Context()
    h = SchedulerHarness(overlap=False, kv_events_port=port, kv_events_block_size=8)
    s = h.scheduler
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, kv_events.TOPIC)
    sub.connect(f"tcp://127.0.0.1:{port}")
    try:
        while not s.kv_events.active:
            s.kv_events.tick(s.kv.cache)
        h.submit("a", ask(0), max_new_tokens=30, ignore_eos=True)
        h.step()
        assert h.finish("a") is None
        events = []
        while sub.poll(500):
            events += kv_events.EventBatch.decode(sub.recv_multipart()[1]).events
        stored = [b for e in events if e["type"] == "stored" for b in e["hashes"]]
        assert stored == kv_events.prefix_hashes(ask(0), 8)  # 43 tokens: 5 whole blocks
        kinds = [e["type"] for e in events]
        assert kinds[0] == "queued" and kinds[-1] == "settled" and set(kinds[1:-1]) == {"stored"}, kinds
        assert events[0] == kv_events.queued("a", kv_events.prefix_hashes(ask(0)[:-1], 8))
        assert events[-1] == kv_events.settled(["a"])
        h.run()
        later = []
        while sub.poll(300):
            later += kv_events.EventBatch.decode(sub.recv_multipart()[1]).events
        assert {e["type"] for e in later} <= {"stored"}, later  # finishing settles nothing more
    finally:
        s.io.close()
        s.kv_events.close()
        ctx.destroy(linger=0)


# ---- which requests wait (PrefillAdder over a real radix cache) -----------------------------
def make_kv(page_size: int = 1) -> KVManager:
    allocator = TokenSlotAllocator(2048, page_size)
    return KVManager(allocator, ReqToTokenTable(9, 512, "cpu"), RadixCache(allocator, page_size))


def req(rid: str, prompt: list[int], **extra) -> Req:
    return Req(rid, prompt, SamplingParams(max_new_tokens=8), **extra)


def one_batch(kv: KVManager, reqs: list[Req], chunk: int = 1024) -> list[Req]:
    adder = PrefillAdder(kv, [], chunk, 8, 1.0)
    for r in reqs:
        if not adder.add(r):
            break
    return adder.batch


def test_a_request_waits_only_for_a_long_enough_share_with_the_batch():
    kv = make_kv()
    base = list(range(100, 100 + IN_BATCH_SHARE_MIN))
    first, full, short = req("first", base + [1, 2]), req("full", base + [3]), req("short", base[:-1] + [7, 8])
    assert one_batch(kv, [first, full, short]) == [first, short]
    assert full.deferred and full.row is None and not short.deferred


def test_a_request_is_never_deferred_twice_nor_first_in_its_batch():
    kv = make_kv()
    prompt = list(range(200, 260))
    a, b = req("a", prompt + [1]), req("b", prompt + [2])
    assert one_batch(kv, [a, b]) == [a]  # b waits
    # Nothing was cached (the scheduler would have); b still starts in the next batch,
    # even behind another request sharing its prompt.
    again = req("again", prompt + [3])
    assert one_batch(kv, [again, b]) == [again, b]
    alone = req("alone", prompt + [4])
    assert one_batch(kv, [alone]) == [alone]


def test_requests_that_cannot_reuse_the_prefix_do_not_wait():
    kv = make_kv()
    prompt = list(range(300, 360))
    first = req("first", prompt + [1])
    lora = req("lora", prompt + [2], lora_id=1)
    logprobs = req("logprobs", prompt + [3])
    # Prompt logprobs from position 0: every prompt token must be computed.
    logprobs.outputs = ReqOutputs(len(logprobs.input_ids), True, 0, 0, False, False, None)
    assert one_batch(kv, [first, lora, logprobs]) == [first, lora, logprobs]
    disabled = KVManager(kv.allocator, kv.table, RadixCache(kv.allocator, disabled=True))
    x, y = req("x", prompt + [4]), req("y", prompt + [5])
    assert one_batch(disabled, [x, y]) == [x, y]
