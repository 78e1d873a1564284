"""PrefillAdder: which waiting requests join a prefill batch (engine/managers/prefill.py).

Real allocator, request table and (disabled) radix cache on CPU; requests are driven through
the same admit / extend calls the scheduler makes.
"""

from __future__ import annotations

from radixfleet.engine.managers.kv_manager import KVManager
from radixfleet.engine.managers.prefill import PrefillAdder, decode_reserve
from radixfleet.engine.managers.request import Req
from radixfleet.engine.memory.allocator import TokenSlotAllocator
from radixfleet.engine.memory.radix_cache import RadixCache
from radixfleet.engine.memory.req_table import ReqToTokenTable
from radixfleet.engine.sampling.params import SamplingParams

MAX_RUNNING = 3


def make_kv(slots: int = 2000) -> KVManager:
    allocator = TokenSlotAllocator(slots)
    return KVManager(allocator, ReqToTokenTable(MAX_RUNNING + 1, 512, "cpu"),
                     RadixCache(allocator, disabled=True))


def req(i: int, prompt_len: int, max_new: int = 16) -> Req:
    return Req(f"r{i}", list(range(3, 3 + prompt_len)), SamplingParams(max_new_tokens=max_new))


def prefill(kv: KVManager, running: list[Req], chunk: int, reqs: list[Req], ratio: float = 1.0,
            chunked: Req | None = None) -> tuple[list[Req], PrefillAdder]:
    """One scheduler prefill step: the chunked request first, then waiting ones in order;
    finished prefills join ``running`` as the scheduler's launch does."""
    adder = PrefillAdder(kv, running, chunk, MAX_RUNNING, ratio)
    if chunked is None or adder.add(chunked, continuing=True):
        for r in reqs:
            if not adder.add(r):
                break
    for r in adder.batch:
        r.kv_len += r.extend_len
        if r.kv_len == len(r.fill_ids):
            running.append(r)
    return adder.batch, adder


def test_running_requests_never_exceed_the_cap_while_a_prefill_is_chunked():
    kv = make_kv()
    running: list[Req] = []
    a, b, long = req(0, 10), req(1, 10), req(2, 100)
    batch, _ = prefill(kv, running, 40, [a, b, long])
    assert batch == [a, b, long] and running == [a, b]  # long got 20 of its 100 tokens
    # Next step: long continues; a new request would be the fourth with MAX_RUNNING = 3.
    late = req(3, 5)
    batch, adder = prefill(kv, running, 40, [late], chunked=long)
    assert batch == [long] and late.row is None
    assert adder.slots_left == 0
    assert len(running) + 1 <= MAX_RUNNING  # a, b and the still-chunked long


def test_a_chunked_request_reserves_its_decode_tokens():
    kv = make_kv(slots=400)
    running: list[Req] = []
    long = req(0, 300, max_new=50)
    prefill(kv, running, 200, [long])
    assert long.kv_len == 200 and not running
    free = kv.free_tokens  # 199: slot 0 is the padding slot
    # long needs 100 more slots for its prompt and reserves 50 for decoding, so a 40-token
    # prompt reserving 30 does not fit (100 + 50 + 40 + 30 > 199) ...
    small = req(1, 40, max_new=30)
    batch, adder = prefill(kv, running, 400, [small], chunked=long)
    assert batch == [long] and small.row is None
    assert adder.kv_budget == free - 100 - decode_reserve(long, 1.0)
    # ... and one reserving 10 does (100 + 50 + 30 + 10 <= 199).
    kv2 = make_kv(slots=400)
    long2 = req(0, 300, max_new=50)
    prefill(kv2, [], 200, [long2])
    fits = req(1, 30, max_new=10)
    batch, _ = prefill(kv2, [], 400, [fits], chunked=long2)
    assert batch == [long2, fits]
