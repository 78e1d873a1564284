"""The overlap schedule, decided in-process (engine/managers/scheduler.py): a Scheduler over
a fake model runner (tests/fake_runner.py) whose expected outputs come from ``reference``.

With overlap on, step N's tokens are processed after step N+1 is launched; a request that
stops is found one step late and its extra token is dropped; a request whose in-flight
token is its last is left out of the next decode; and what users receive is the same as
with overlap off."""

from __future__ import annotations

import pytest
from fake_runner import EOS, Launch, SchedulerHarness, Sent, prompt_stopping_at, reference

PROMPT = [40, 41, 42, 43, 44]


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_when_each_step_is_processed(overlap):
    t = reference(PROMPT, 3)
    h = SchedulerHarness(overlap=overlap)
    h.submit("a", PROMPT, stream=True, max_new_tokens=3)
    h.run()
    extend, decode = Launch("extend", ("a",)), Launch("decode", ("a",))
    sent = [Sent("a", (t[0],), None, 0), Sent("a", (t[1],), None, 0),
            Sent("a", (t[2],), {"type": "length", "length": 3}, 0)]
    if overlap:  # after the next step is launched; the last when there is nothing to launch
        assert h.events == [extend, decode, sent[0], decode, sent[1], sent[2]]
    else:  # at once
        assert h.events == [extend, sent[0], decode, sent[1], decode, sent[2]]
    h.assert_all_free()


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_a_request_at_its_length_limit_is_left_out_of_the_next_decode(overlap):
    h = SchedulerHarness(overlap=overlap)
    h.submit("short", PROMPT, max_new_tokens=2, ignore_eos=True)
    h.submit("long", [50, 60, 70, 80], max_new_tokens=5, ignore_eos=True)
    h.run()
    # With overlap, "short"'s second token is still in flight when the second decode is
    # launched: it is its last, so "short" is not in that decode.
    assert h.launches() == [Launch("extend", ("short", "long")), Launch("decode", ("short", "long")),
                            *[Launch("decode", ("long",))] * 3]
    assert h.tokens("short") == reference(PROMPT, 2, stop_ids=())
    assert h.finish("short") == {"type": "length", "length": 2}
    assert h.tokens("long") == reference([50, 60, 70, 80], 5, stop_ids=())
    h.assert_all_free()


def test_a_stop_is_found_one_step_late_and_the_extra_token_is_never_sent():
    eos_prompt = prompt_stopping_at(3)
    stop_id_prompt = [50, 60, 70, 80]
    plain = reference(stop_id_prompt, 20, stop_ids=())
    stop_id = plain[4]
    assert stop_id not in plain[:4] and EOS not in plain[:5]
    launches_with = {}
    for overlap in (True, False):
        h = SchedulerHarness(overlap=overlap)
        h.submit("eos", eos_prompt, stream=True, max_new_tokens=20)
        h.submit("stop_id", stop_id_prompt, stream=True, max_new_tokens=20, stop_token_ids=[stop_id])
        h.submit("other", [33, 34, 35], stream=True, max_new_tokens=12, ignore_eos=True)
        h.run()
        assert h.tokens("eos") == reference(eos_prompt, 20) and h.tokens("eos")[-1] == EOS
        assert h.finish("eos") == {"type": "stop", "matched": EOS}
        assert h.tokens("stop_id") == plain[:5]
        assert h.finish("stop_id") == {"type": "stop", "matched": stop_id}
        assert h.tokens("other") == reference([33, 34, 35], 12, stop_ids=())
        sent = sum(len(h.tokens(rid)) for rid in ("eos", "stop_id", "other"))
        assert h.scheduler.stats["generated_tokens"] == sent  # the dropped tokens are not counted
        h.assert_all_free()
        launches_with[overlap] = {rid: sum(rid in launch.rids for launch in h.launches())
                                  for rid in ("eos", "stop_id")}
    # One step per token without overlap; with it, a step more whose token is dropped.
    assert launches_with[False] == {"eos": 3, "stop_id": 5}
    assert launches_with[True] == {"eos": 4, "stop_id": 6}


def _ascii(tokens: list[int]) -> str:
    """Ids 17..110 of the default model's tokenizer are the characters '!'..'~'."""
    assert all(17 <= t <= 110 for t in tokens)
    return "".join(chr(t + 16) for t in tokens)


def test_outputs_are_identical_with_overlap_on_and_off():
    # More requests than running slots, a chunked prompt, and every way to finish: EOS, a
    # stop id, a stop string, length (1 and 2 tokens: in the prefill step and right after it).
    stop_id = reference([50, 60, 70, 80], 9)[8]
    assert _ascii(reference(PROMPT, 4)) == "'LL:"  # the stop string "L:" ends at the 4th token
    requests = [  # rid, prompt, sampling parameters, expected output
        ("eos", prompt_stopping_at(5), {"max_new_tokens": 30}, reference(prompt_stopping_at(5), 30)),
        ("stop_id", [50, 60, 70, 80], {"max_new_tokens": 30, "stop_token_ids": [stop_id]},
         reference([50, 60, 70, 80], 9)),
        ("stop_str", PROMPT, {"max_new_tokens": 30, "stop": "L:"}, reference(PROMPT, 4)),
        ("one", [33, 34, 35], {"max_new_tokens": 1}, reference([33, 34, 35], 1)),
        ("two", [36, 37], {"max_new_tokens": 2}, reference([36, 37], 2)),
        ("long_prompt", list(range(17, 77)), {"max_new_tokens": 9, "ignore_eos": True},
         reference(list(range(17, 77)), 9, stop_ids=())),
    ] + [(f"n{i}", [20 + i, 90 - i, 45], {"max_new_tokens": 6 + 3 * i, "ignore_eos": True},
          reference([20 + i, 90 - i, 45], 6 + 3 * i, stop_ids=())) for i in range(6)]
    sent = {}
    for overlap in (True, False):
        h = SchedulerHarness(overlap=overlap, max_running_requests=4, chunked_prefill_size=16)
        for i, (rid, prompt, params, _) in enumerate(requests):
            h.submit(rid, prompt, stream=i % 2 == 0, **params)
        h.run()
        for rid, _, _, expected in requests:
            assert h.tokens(rid) == expected, rid
        sent[overlap] = {rid: [(e.tokens, e.finish) for e in h.sent(rid)] for rid, *_ in requests}
        h.assert_all_free()
    assert sent[True] == sent[False]  # the same chunks and finish reasons
    assert sent[True]["stop_str"][-1][1] == {"type": "stop", "matched": "L:"}
    assert sent[True]["eos"][-1][1] == {"type": "stop", "matched": EOS}
