"""KV pressure and aborts, decided in-process (engine/managers/scheduler.py) over a fake model
runner with the real slot allocator and request table (tests/fake_runner.py).

A decode that finds no free slot sends the newest running requests back to the queue with
their output so far; they finish with the same tokens as without pressure. A lone request
that outgrows the whole pool finishes by length. An aborted request, wherever it is, gets
one abort finish and gives back every KV slot and table row."""

from __future__ import annotations

import pytest
from fake_runner import SchedulerHarness, reference

BOTH = pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])


def prompt(i: int) -> list[int]:
    return [20 + i, 30 + i, 40 + i, 50 + i, 60 + i, 70 + i, 80 + i, 90 + i]


@BOTH
@pytest.mark.parametrize("radix_cache", [True, False], ids=["cache", "no_cache"])
def test_retraction_requeues_the_newest_with_their_output_and_they_finish_the_same(overlap, radix_cache):
    # 6 requests of 8 + 24 tokens need 192 slots; the pool has 100.
    h = SchedulerHarness(overlap=overlap, max_total_tokens=100, disable_radix_cache=not radix_cache)
    for i in range(6):
        h.submit(f"r{i}", prompt(i), stream=True, max_new_tokens=24, ignore_eos=True)
    s = h.scheduler
    while s.stats["retractions"] == 0:
        running_before = list(s.running)
        h.step()
        assert s.running or s.waiting, "finished without a retraction"
    retracted = [r for r in running_before if r not in s.running]
    assert retracted and s.waiting[:len(retracted)] == sorted(retracted, key=lambda r: r.arrival_time)
    assert max(r.arrival_time for r in s.running) < min(r.arrival_time for r in retracted)
    for r in retracted:
        i = int(r.rid[1:])
        assert r.output_ids and r.output_ids == reference(prompt(i), 24, stop_ids=())[:len(r.output_ids)]
        assert h.tokens(r.rid) == r.output_ids  # streamed so far: not sent again later
        assert r.row is None and r.pending == 0
    h.run()
    for i in range(6):
        assert h.tokens(f"r{i}") == reference(prompt(i), 24, stop_ids=())
        assert h.finish(f"r{i}") == {"type": "length", "length": 24}
    h.assert_all_free()


@BOTH
@pytest.mark.parametrize("radix_cache", [True, False], ids=["cache", "no_cache"])
def test_decode_under_pressure_with_pages_retracts_instead_of_failing(overlap, radix_cache):
    """Regression: with page_size > 1 a decode step counted one slot per request, but a
    request whose last page is full takes a whole new page; with 100 slots in pages of 4 the
    step found fewer than it had counted and the scheduler failed ("decode slots were
    checked above") instead of retracting."""
    h = SchedulerHarness(overlap=overlap, max_total_tokens=100, page_size=4, disable_radix_cache=not radix_cache)
    for i in range(6):
        h.submit(f"r{i}", prompt(i), stream=True, max_new_tokens=24, ignore_eos=True)
    h.run()
    for i in range(6):
        assert h.tokens(f"r{i}") == reference(prompt(i), 24, stop_ids=())
    assert h.scheduler.stats["retractions"] > 0
    h.assert_all_free()


@BOTH
def test_a_lone_request_that_outgrows_the_whole_pool_finishes_by_length(overlap):
    # 40 slots: the 10 prompt tokens and 30 outputs; the 31st output is sampled but has no
    # slot for its KV, so no 32nd can be computed.
    h = SchedulerHarness(overlap=overlap, max_total_tokens=40)
    long_prompt = list(range(30, 40))
    h.submit("big", long_prompt, max_new_tokens=100, ignore_eos=True)
    h.run()
    assert h.tokens("big") == reference(long_prompt, 31, stop_ids=())
    assert h.finish("big") == {"type": "length", "length": 31, "message": "the KV cache is full"}
    h.assert_all_free()


@BOTH
def test_abort_a_queued_a_prefilling_and_a_decoding_request(overlap):
    # Two running slots; prefills of at most 8 tokens a step.
    h = SchedulerHarness(overlap=overlap, max_running_requests=2, chunked_prefill_size=8)
    s = h.scheduler
    h.submit("decoding", prompt(0), stream=True, max_new_tokens=50, ignore_eos=True)
    for _ in range(3):
        h.step()
    h.submit("prefilling", list(range(17, 57)), max_new_tokens=5)  # 40 tokens: 5 chunks
    h.submit("queued", prompt(1), max_new_tokens=5)
    h.step()  # the first chunk of "prefilling"; "queued" finds no running slot
    h.step()
    assert s.chunked is not None and s.chunked.rid == "prefilling"
    assert [r.rid for r in s.waiting] == ["queued"]
    assert [r.rid for r in s.running] == ["decoding"]

    for rid in ("queued", "prefilling"):
        s._abort(rid)
        assert h.tokens(rid) == [] and h.finish(rid)["type"] == "abort", rid
    assert s.chunked is None and not s.waiting
    decoding = s.running[0]
    assert s.kv.free_tokens == h.runner.max_total_tokens - decoding.kv_len

    for _ in range(3):
        h.step()
    if overlap:  # a decode of it is in flight
        assert decoding in s.in_flight.reqs and decoding.pending == 1
    streamed = h.tokens("decoding")
    assert len(streamed) >= 3 and streamed == reference(prompt(0), len(streamed), stop_ids=())
    s._abort("decoding")
    h.run()  # the step in flight, if any: its token for "decoding" is dropped
    assert h.finish("decoding")["type"] == "abort"
    assert h.tokens("decoding") == streamed
    h.assert_all_free()

    # The freed slots and rows serve a new request correctly.
    h.submit("after", prompt(2), max_new_tokens=12, ignore_eos=True)
    h.run()
    assert h.tokens("after") == reference(prompt(2), 12, stop_ids=())
    h.assert_all_free()
