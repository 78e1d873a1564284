"""Greedy output equals HF transformers (fp32, CPU) on the default model, under every
scheduling path: alone, batched, radix cache on/off and reused, a KV pool small enough to
force retraction, and chunked prefill."""

from __future__ import annotations

import pytest
from helpers import PROMPTS, hf_greedy

from radixfleet.engine.engine import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 32}


def assert_matches(reference: list[int], out: dict) -> None:
    # HF stops at EOS as we do; compare the whole continuation.
    assert out["output_ids"] == reference, out["text"]


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_path=model_dir, max_total_tokens=8192) as e:
        yield e


def test_each_prompt_alone_matches_hf(engine, hf_reference):
    for prompt, ref in zip(PROMPTS, hf_reference):
        assert_matches(ref, engine.generate(prompt, GREEDY))


def test_batch_matches_hf_and_second_pass_hits_the_cache(engine, hf_reference):
    engine.flush_cache()
    first = engine.generate(PROMPTS, GREEDY)
    assert isinstance(first, list) and len(first) == len(PROMPTS)
    for ref, out in zip(hf_reference, first):
        assert_matches(ref, out)
    second = engine.generate(PROMPTS, GREEDY)
    for ref, out in zip(hf_reference, second):
        assert_matches(ref, out)
        assert out["meta_info"]["cached_tokens"] > 0
    assert all(o["meta_info"]["cached_tokens"] == 0 for o in first[:1])


def test_torch_only_cpu_path_matches_hf(model_dir, hf_reference, monkeypatch):
    """With the C kernels switched off (kernels/cpu_ops.py), the plain torch ops decode the
    same tokens: the fallback where no compiler is available."""
    monkeypatch.setenv("RADIXFLEET_CPU_KERNELS", "0")  # read by the engine's child processes
    with Engine(model_path=model_dir, max_total_tokens=4096) as e:
        outs = e.generate(PROMPTS, GREEDY)
    for ref, out in zip(hf_reference, outs):
        assert_matches(ref, out)


def test_radix_cache_disabled_matches_hf(model_dir, hf_reference):
    with Engine(model_path=model_dir, max_total_tokens=4096, disable_radix_cache=True) as e:
        outs = e.generate(PROMPTS, GREEDY)
        again = e.generate(PROMPTS[:4], GREEDY)
    for ref, out in zip(hf_reference, outs):
        assert_matches(ref, out)
    assert all(o["meta_info"]["cached_tokens"] == 0 for o in again)


def test_tiny_kv_pool_retracts_and_still_completes_identically(model_dir, hf_reference):
    # 16 prompts × (≈12 prompt + 32 new tokens) need ≈700 slots at once; give 300.
    with Engine(model_path=model_dir, max_total_tokens=300, disable_radix_cache=True) as e:
        outs = e.generate(PROMPTS, GREEDY)
        state = e.get_server_info()["internal_states"][0]
    assert state["retractions"] > 0
    for ref, out in zip(hf_reference, outs):
        assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")
        assert_matches(ref, out)
    assert state["kv_used_tokens"] == 0  # every slot came back


def test_chunked_prefill_of_a_long_prompt_matches_hf(model_dir):
    words = " ".join(f"item{i}" for i in range(400))
    prompt = f"Here is a list: {words}. The list ends here. Summary:"
    ref = hf_greedy(model_dir, prompt, 16)
    with Engine(model_path=model_dir, max_total_tokens=4096, chunked_prefill_size=64) as e:
        out = e.generate(prompt, {"temperature": 0, "max_new_tokens": 16})
    assert out["meta_info"]["prompt_tokens"] >= 1000
    assert out["output_ids"] == ref


def test_paged_fcfs_with_few_running_slots_matches_hf(model_dir, hf_reference):
    # page_size 4: prefixes are reused a whole page at a time; at most 3 requests decode
    # together, the rest wait their turn in arrival order.
    with Engine(model_path=model_dir, max_total_tokens=2048, page_size=4, schedule_policy="fcfs",
                max_running_requests=3) as e:
        first = e.generate(PROMPTS, GREEDY)
        second = e.generate(PROMPTS, GREEDY)
        state = e.get_server_info()["internal_states"][0]
    for ref, a, b in zip(hf_reference, first, second):
        assert_matches(ref, a)
        assert_matches(ref, b)
        cached, prompt = b["meta_info"]["cached_tokens"], b["meta_info"]["prompt_tokens"]
        # Whole pages only, and at least one token is always computed.
        assert cached % 4 == 0 and cached == (prompt - 1) // 4 * 4
    assert state["kv_used_tokens"] == 0
