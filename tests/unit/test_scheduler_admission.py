"""Which waiting request runs next, decided in-process (engine/managers/scheduler.py,
prefill.py) over a fake model runner (tests/fake_runner.py): the running cap counts the
request part-way through a chunked prefill, and the schedule policy orders the queue
(lpm: longest cached prefix first; fcfs: arrival order)."""

from __future__ import annotations

import pytest
from fake_runner import SchedulerHarness, reference


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_a_chunked_prefill_holds_a_running_slot(overlap):
    h = SchedulerHarness(overlap=overlap, max_running_requests=2, chunked_prefill_size=8)
    s = h.scheduler
    prompts = {"a": [20, 21, 22, 23], "long": list(range(30, 60)), "c": [24, 25, 26], "d": [27, 28]}
    lengths = {"a": 12, "long": 4, "c": 6, "d": 6}
    for rid, p in prompts.items():
        h.submit(rid, p, max_new_tokens=lengths[rid], ignore_eos=True)
    h.step()
    assert s.chunked is not None and s.chunked.rid == "long"  # 4 of its 30 tokens
    assert [r.rid for r in s.running] == ["a"] and [r.rid for r in s.waiting] == ["c", "d"]
    while s._busy():
        assert len(s.running) + (s.chunked is not None) <= 2
        assert s.internal_state()["num_running_requests"] <= 2
        h.step()
    # "c" starts only once "a" or "long" has finished, and "d" after one more.
    first_finish = min(h.events.index(h.sent(rid)[-1]) for rid in ("a", "long"))
    c_start = h.events.index(next(e for e in h.launches() if "c" in e.rids))
    assert c_start > first_finish
    for rid, p in prompts.items():
        assert h.tokens(rid) == reference(p, lengths[rid], stop_ids=())
    assert s.stats["peak_running_requests"] == 2
    h.assert_all_free()


SHARED = list(range(40, 64))  # 24 tokens, cached by a first request


@pytest.mark.parametrize("policy, order", [("lpm", ["long_match", "short_match", "no_match"]),
                                           ("fcfs", ["no_match", "short_match", "long_match"])])
def test_schedule_policy_orders_the_queue(policy, order):
    # One running slot: each prefill admits one request, the first in the policy's order.
    h = SchedulerHarness(overlap=True, max_running_requests=1, schedule_policy=policy)
    h.submit("warm", SHARED, max_new_tokens=1)
    h.run()
    prompts = {"no_match": [90, 91, 92, 93, 94, 95],  # arrives first
               "short_match": SHARED[:8] + [20, 21, 22],
               "long_match": SHARED + [20, 21]}  # arrives last
    for rid, p in prompts.items():
        h.submit(rid, p, max_new_tokens=3)
    h.run()
    assert [launch.rids for launch in h.launches("extend")] == [("warm",)] + [(rid,) for rid in order]
    for rid, p in prompts.items():
        assert h.tokens(rid) == reference(p, 3)
    # What each reused from the radix cache, as reported to the user.
    assert {rid: h.sent(rid)[-1].cached_tokens for rid in prompts} == \
        {"no_match": 0, "short_match": 8, "long_match": 24}
    h.assert_all_free()


def test_a_request_waiting_for_its_grammar_counts_as_queued():
    """Regression (issue #20 soak): a structured-output request whose grammar was compiling
    was in no queue that internal_state counted, so /metrics read 0 queued while it waited."""
    h = SchedulerHarness(overlap=False)
    h.submit("structured", [20, 21, 22], max_new_tokens=2, regex="(yes|no)")
    h.scheduler._recv(block=False)
    state = h.scheduler.internal_state()
    assert state["num_queued_requests"] == 1 and state["req_rows_free"] == h.runner.req_table.available
