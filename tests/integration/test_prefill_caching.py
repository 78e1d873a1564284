"""Concurrent requests on a new shared context compute it once (the default model on CPU,
fp32): a prompt enters the radix cache when its prefill is computed (chunk by chunk), and a
request sharing a long new prefix with one in the same prefill batch waits a step for it.

What a user sees: the later requests report the context as ``cached_tokens`` although the
first one has not finished; every output equals HF transformers' greedy continuation of the
same prompt alone; under memory pressure (retraction, eviction) too; and once idle every KV
slot is back (``kv_used_tokens`` 0, and after a flush the whole pool free)."""

from __future__ import annotations

import asyncio

import pytest
from helpers import hf_greedy

from radixfleet import Engine

_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
_TOWNS = ["Lyon", "Porto", "Graz", "Turku", "Ghent", "Split", "Bergen", "Cork", "Brno", "Pisa"]


def context(shelves: int) -> str:
    """A new document (~25 tokens a shelf; 31 shelves: ~770 tokens)."""
    return "Inventory report for the northern warehouse.\n" + "".join(
        f"Shelf {i}: {_COLORS[i % 8]} boxes from {_TOWNS[i % 10]}, {3 + (i * 7) % 11} of them, "
        f"checked on day {1 + (i * 5) % 28}.\n" for i in range(shelves))


CONTEXT = context(31)
QUESTIONS = ["Question: which shelf holds boxes from Porto?", "Task: list the colors on shelves 1 to 3.",
             "Summary of shelf 5:"]
GREEDY = {"temperature": 0, "max_new_tokens": 12}


def encode(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer_manager.tokenizer.encode(text)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def assert_idle_and_all_free(engine: Engine) -> None:
    state = engine.get_server_info()["internal_states"][0]
    assert state["num_running_requests"] == state["num_queued_requests"] == 0
    assert state["kv_used_tokens"] == 0  # every slot is free or an unlocked cached prefix
    assert engine.flush_cache()
    state = engine.get_server_info()["internal_states"][0]
    assert state["free_tokens"] == engine.get_server_info()["max_total_tokens"]


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_path=model_dir, max_total_tokens=8192) as e:
        yield e


def test_requests_sharing_a_new_context_sent_at_once_compute_it_once(engine, model_dir):
    engine.flush_cache()
    prompts = [CONTEXT + q for q in QUESTIONS]
    ids = [encode(engine, p) for p in prompts]
    shared = common_prefix(ids[0], ids[1])
    assert shared > 700 and all(common_prefix(ids[0], i) == shared for i in ids[1:])
    outs = engine.generate(prompts, GREEDY)
    # The first computes the context; the others wait a step and reuse it.
    assert [o["meta_info"]["cached_tokens"] for o in outs] == [0, shared, shared]
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["output_ids"] == hf_greedy(model_dir, prompt, GREEDY["max_new_tokens"])
    assert_idle_and_all_free(engine)


def test_a_request_arriving_while_another_decodes_reuses_its_context(engine, model_dir):
    engine.flush_cache()
    long_params = {"temperature": 0, "max_new_tokens": 160, "ignore_eos": True}

    async def scenario() -> tuple[dict, list[int], list[str]]:
        events: list[str] = []
        first_ids: list[int] = []

        async def first() -> None:
            async for chunk in await engine.async_generate(CONTEXT + QUESTIONS[0], long_params, stream=True):
                first_ids.extend(chunk["output_ids"])
                events.append("first streams")
            events.append("first done")

        task = asyncio.create_task(first())
        while not events:  # it streams: its prefill is done
            await asyncio.sleep(0.01)
        late = await engine.async_generate(CONTEXT + QUESTIONS[1], GREEDY)
        events.append("late done")
        await task
        return late, first_ids, events

    late, first_ids, events = asyncio.run(scenario())
    assert events.index("late done") < events.index("first done")  # it arrived and ended meanwhile
    shared = common_prefix(encode(engine, CONTEXT + QUESTIONS[0]), encode(engine, CONTEXT + QUESTIONS[1]))
    assert late["meta_info"]["cached_tokens"] == shared
    assert late["output_ids"] == hf_greedy(model_dir, CONTEXT + QUESTIONS[1], GREEDY["max_new_tokens"])
    # HF stops at EOS; ignore_eos goes on past it.
    ref = hf_greedy(model_dir, CONTEXT + QUESTIONS[0], 160)
    assert len(first_ids) == 160 and first_ids[:len(ref)] == ref
    assert_idle_and_all_free(engine)


@pytest.mark.parametrize("page_size", [1, 16])
def test_a_chunked_prefill_is_cached_chunk_by_chunk(model_dir, page_size):
    chunk = 64
    with Engine(model_path=model_dir, max_total_tokens=4096, chunked_prefill_size=chunk,
                page_size=page_size) as e:
        base = encode(e, CONTEXT)
        questions = [encode(e, "\nQ: Porto?"), encode(e, "\nQ: Brno?")]
        assert len(questions[0]) == len(questions[1]) and questions[0][0] == questions[1][0]
        # Two prompts of the same length whose last chunk holds 1 to 31 tokens, all of the
        # second's question: the second request is admitted beside that last chunk (too
        # little left to wait for) and finds every earlier chunk already cached.
        cut = len(base) - (len(base) + len(questions[0])) % chunk + 8
        prompts = [base[:cut] + q for q in questions]
        total = len(prompts[0])
        assert 0 < total % chunk < 32 and cut >= total - total % chunk
        outs = e.generate(input_ids=prompts, sampling_params=GREEDY)
        assert sorted(o["meta_info"]["cached_tokens"] for o in outs) == [0, total - total % chunk]
        for ids, out in zip(prompts, outs, strict=True):
            assert out["output_ids"] == hf_greedy(model_dir, ids, GREEDY["max_new_tokens"])
        assert_idle_and_all_free(e)


def test_memory_pressure_with_shared_contexts_stays_exact_and_leaks_nothing(model_dir):
    # Two contexts of ~250 tokens, each continued 3 ways, and 2 unrelated prompts, 40 tokens
    # each, in a 600-slot pool: the running requests outgrow it (retraction) and cached
    # prefixes are evicted to make room.
    contexts = [context(10), context(11).replace("northern", "southern")]
    prompts = [c + q for c in contexts for q in ("Shelf 40:", "Shelf 52: green", "Remarks:")] + \
        ["The history of the old lighthouse on the northern cape begins in", "def fibonacci(n):"]
    params = {"temperature": 0, "max_new_tokens": 40}
    with Engine(model_path=model_dir, max_total_tokens=600) as e:
        outs = e.generate(prompts, params)
        state = e.get_server_info()["internal_states"][0]
        assert state["retractions"] > 0 and state["cached_tokens"] > 0
        for prompt, out in zip(prompts, outs, strict=True):
            assert out["output_ids"] == hf_greedy(model_dir, prompt, 40), prompt
        assert_idle_and_all_free(e)
