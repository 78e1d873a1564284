"""The overlap schedule (host work on step N while the device runs step N+1) gives exactly
what the step-by-step schedule gives: the same tokens, text, finish reasons and counts,
through stops found one step late, streaming, retraction, aborts, radix-cache reuse, and
requests that force a sync (grammar, logprobs). On CPU overlap is off unless forced with
``disable_overlap_schedule=False``, which is what these tests do."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
from helpers import PROMPTS, make_tiny_model

from radixfleet.engine.engine import Engine

CHAT = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"  # ends with EOS early


def greedy(n: int, **extra) -> dict:
    return {"temperature": 0, "max_new_tokens": n, **extra}


def result(out: dict) -> tuple:
    meta = out["meta_info"]
    return out["output_ids"], out["text"], meta["finish_reason"], meta["completion_tokens"]


def generated_tokens(engine: Engine) -> int:
    return engine.get_server_info()["internal_states"][0]["generated_tokens"]


def assert_idle(engine: Engine) -> None:
    state = engine.get_server_info()["internal_states"][0]
    assert state["num_running_requests"] == 0 and state["kv_used_tokens"] == 0


@pytest.fixture(scope="module")
def overlap(model_dir):
    with Engine(model_path=model_dir, max_total_tokens=4096, disable_overlap_schedule=False) as e:
        assert e.get_server_info()["overlap_schedule"] is True
        yield e


@pytest.fixture(scope="module")
def serial(model_dir):
    with Engine(model_path=model_dir, max_total_tokens=4096, disable_overlap_schedule=True) as e:
        assert e.get_server_info()["overlap_schedule"] is False
        yield e


def both(overlap: Engine, serial: Engine, *args, **kwargs) -> tuple[list, list]:
    return overlap.generate(*args, **kwargs), serial.generate(*args, **kwargs)


def test_auto_mode_is_off_on_cpu(model_dir):
    with Engine(model_path=model_dir, max_total_tokens=256) as e:
        assert e.get_server_info()["overlap_schedule"] is False


def test_mixed_batch_matches_and_counts_only_kept_tokens(overlap, serial):
    # Lengths 1 and 2 finish in the prefill step and right after it; seeds, penalties and
    # min_new_tokens read each request's position, which counts its in-flight token.
    params = [greedy(1 + 3 * (i % 6)) for i in range(len(PROMPTS))]
    params[1] = {"temperature": 0.9, "seed": 11, "max_new_tokens": 12}
    params[2] = greedy(12, frequency_penalty=1.5, presence_penalty=0.5)
    params[3] = greedy(12, min_new_tokens=10)
    params[4] = greedy(2)
    before = generated_tokens(overlap)
    ours, ref = both(overlap, serial, PROMPTS, params)
    assert [result(o) for o in ours] == [result(o) for o in ref]
    assert ours[0]["meta_info"]["completion_tokens"] == 1
    assert generated_tokens(overlap) - before == sum(o["meta_info"]["completion_tokens"] for o in ours)
    assert_idle(overlap)


def test_stops_end_at_the_same_token_and_the_late_token_is_dropped(overlap, serial):
    full = serial.generate(PROMPTS[0], greedy(24))
    ids, text = full["output_ids"], full["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    prompts = [PROMPTS[0], PROMPTS[0], CHAT, PROMPTS[5], PROMPTS[6]]
    params = [greedy(24, stop=stop), greedy(24, stop_token_ids=[ids[5]]), greedy(64),
              greedy(30, ignore_eos=True), greedy(20, stop=[stop, "never-xyz"], no_stop_trim=True)]
    before = generated_tokens(overlap)
    ours, ref = both(overlap, serial, prompts, params)
    assert [result(o) for o in ours] == [result(o) for o in ref]
    assert ours[0]["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert ours[0]["text"] == text[:text.find(stop)]
    assert ours[1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[5]}
    assert ours[1]["output_ids"] == ids[:ids.index(ids[5]) + 1]
    assert ours[2]["meta_info"]["finish_reason"]["type"] == "stop"  # EOS
    assert ours[2]["meta_info"]["completion_tokens"] < 64
    assert generated_tokens(overlap) - before == sum(o["meta_info"]["completion_tokens"] for o in ours)
    # Streamed, the same batch gives the same text and ids per request.
    chunks = defaultdict(list)
    for c in overlap.generate(prompts, params, stream=True):
        chunks[c["index"]].append(c)
    for i, out in enumerate(ours):
        assert "".join(c["text"] for c in chunks[i]) == out["text"]
        assert sum((c["output_ids"] for c in chunks[i]), []) == out["output_ids"]
        assert chunks[i][-1]["meta_info"]["finish_reason"] == out["meta_info"]["finish_reason"]
    assert_idle(overlap)


def test_second_pass_hits_the_radix_cache_with_the_same_output(overlap, serial):
    assert overlap.flush_cache()
    params = greedy(16)
    first, ref = both(overlap, serial, PROMPTS[:8], params)
    second = overlap.generate(PROMPTS[:8], params)
    assert [result(o) for o in first] == [result(o) for o in ref] == [result(o) for o in second]
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in second)
    assert_idle(overlap)


def test_grammar_and_logprob_requests_mixed_into_an_overlapped_batch(overlap, serial):
    pattern = r"(yes|no), [0-9]{2,4}\."
    prompts = [PROMPTS[0], PROMPTS[1], CHAT, PROMPTS[3], PROMPTS[4]]
    params = [greedy(20), greedy(16, regex=pattern), greedy(64), greedy(10), greedy(24)]
    logprob = [False, False, True, False, True]  # one stops on EOS, one on length
    ours, ref = both(overlap, serial, prompts, params, return_logprob=logprob, top_logprobs_num=2)
    assert [result(o) for o in ours] == [result(o) for o in ref]
    assert re.fullmatch(pattern, ours[1]["text"])
    assert ours[2]["meta_info"]["finish_reason"]["type"] == "stop"
    streamed = defaultdict(list)
    for c in overlap.generate(prompts, params, return_logprob=logprob, top_logprobs_num=2, stream=True):
        streamed[c["index"]].append(c)
    for i in (2, 4):
        got, want = ours[i]["meta_info"], ref[i]["meta_info"]
        assert len(got["output_token_logprobs"]) == got["completion_tokens"]
        assert [t for _, t, _ in got["output_token_logprobs"]] == ours[i]["output_ids"]
        assert [v for v, _, _ in got["output_token_logprobs"]] == pytest.approx(
            [v for v, _, _ in want["output_token_logprobs"]], abs=1e-4)
        assert len(got["output_top_logprobs"]) == got["completion_tokens"]
        last = streamed[i][-1]["meta_info"]
        assert [t for _, t, _ in last["output_token_logprobs"]] == ours[i]["output_ids"]
    assert_idle(overlap)


def test_aborting_one_request_mid_flight_leaves_the_others_intact(overlap, serial):
    prompts = PROMPTS[:4]
    params = [greedy(20), greedy(200, ignore_eos=True), greedy(14), greedy(24)]
    rids = [f"overlap-abort-{i}" for i in range(4)]
    chunks = defaultdict(list)
    for c in overlap.generate(prompts, params, rid=rids, stream=True):
        chunks[c["index"]].append(c)
        if c["index"] == 1 and len(chunks[1]) == 3:
            overlap.abort_request(rids[1])
    assert chunks[1][-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert sum(len(c["output_ids"]) for c in chunks[1]) < 200
    ref = serial.generate([prompts[i] for i in (0, 2, 3)], [params[i] for i in (0, 2, 3)])
    for i, want in zip((0, 2, 3), ref, strict=True):
        assert sum((c["output_ids"] for c in chunks[i]), []) == want["output_ids"]
        assert chunks[i][-1]["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
    assert_idle(overlap)


def test_tiny_kv_pool_retracts_and_completes_identically(model_dir, serial):
    # 16 prompts × (≈12 prompt + 24 new tokens) need ≈600 slots at once; give 300.
    params = greedy(24, ignore_eos=True)
    ref = serial.generate(PROMPTS, params)
    with Engine(model_path=model_dir, max_total_tokens=300, disable_radix_cache=True,
                disable_overlap_schedule=False) as e:
        ours = e.generate(PROMPTS, params)
        state = e.get_server_info()["internal_states"][0]
    assert state["retractions"] > 0
    assert [result(o) for o in ours] == [result(o) for o in ref]
    assert state["kv_used_tokens"] == 0


def test_tensor_parallel_with_overlap_forced_matches_one_rank(tmp_path):
    # The TP leader copies each decode step's input ids (read from ``last_token``) to the
    # host for its follower: that copy must see the step in flight.
    folder = make_tiny_model("llama3", str(tmp_path / "llama3"))
    prompts = [[5, 17, 99, 3, 250, 8, 41], list(range(10, 70)), [7] * 33, [300, 301]]
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in (16, 9, 2, 12)]
    with Engine(model_path=folder, max_total_tokens=1024, skip_tokenizer_init=True,
                disable_overlap_schedule=True) as e:
        ref = e.generate(input_ids=prompts, sampling_params=params)
    stop_id = ref[0]["output_ids"][6]
    params[0] = {**params[0], "stop_token_ids": [stop_id]}
    with Engine(model_path=folder, tp_size=2, max_total_tokens=1024, skip_tokenizer_init=True,
                chunked_prefill_size=24, disable_overlap_schedule=False) as e:
        assert e.get_server_info()["overlap_schedule"] is True
        ours = e.generate(input_ids=prompts, sampling_params=params)
    ids = ref[0]["output_ids"]
    assert ours[0]["output_ids"] == ids[:ids.index(stop_id) + 1]
    assert ours[0]["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert [o["output_ids"] for o in ours[1:]] == [o["output_ids"] for o in ref[1:]]
