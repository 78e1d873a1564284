"""Sampling parameters on a real engine (default model, CPU), against HF references:
greedy equivalents, seeds, the sampled distribution, penalties, min_new_tokens, stop
strings and token ids, parallel sampling, custom processors refused by default."""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
from helpers import _hf_model, hf_greedy

from radixfleet.engine.engine import Engine

PROMPT = "The capital of France is"
REPEAT_PROMPT = "one two three one two three one two three one two"
CHAT = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_path=model_dir, max_total_tokens=8192) as e:
        yield e


@functools.lru_cache(maxsize=32)
def _hf_logits(model_dir: str, ids: tuple[int, ...]) -> torch.Tensor:
    model, _ = _hf_model(model_dir)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def _encode(model_dir: str, text: str) -> list[int]:
    return _hf_model(model_dir)[1].encode(text)


def test_top_k_1_tiny_top_p_and_min_p_1_reproduce_greedy(engine, model_dir):
    ref = hf_greedy(model_dir, PROMPT, 24)
    for params in ({"top_k": 1}, {"top_p": 1e-9}, {"min_p": 1.0}, {"temperature": 0}):
        out = engine.generate(PROMPT, {**params, "max_new_tokens": 24, "seed": 11})
        assert out["output_ids"] == ref, params


def test_same_seed_same_sample_different_seeds_differ(engine):
    params = {"temperature": 1.0, "max_new_tokens": 24}
    a = engine.generate(PROMPT, {**params, "seed": 42})
    # Batch neighbours and their seeds must not change a seeded request's draw.
    batch = engine.generate([PROMPT, "Once upon a time", PROMPT],
                            [{**params, "seed": 42}, params, {**params, "seed": 43}])
    assert batch[0]["output_ids"] == a["output_ids"]
    others = [engine.generate(PROMPT, {**params, "seed": s})["output_ids"] for s in (1, 2, 3)]
    assert len({tuple(x) for x in [a["output_ids"], batch[2]["output_ids"], *others]}) >= 4


def test_sampled_frequencies_match_the_model_softmax(engine, model_dir):
    prompt = "My favourite food is"
    probs = torch.softmax(_hf_logits(model_dir, tuple(_encode(model_dir, prompt))), -1)
    n = 2000
    outs = engine.generate(prompt, {"temperature": 1.0, "max_new_tokens": 1, "n": n, "seed": 1234})
    counts = Counter(o["output_ids"][0] for o in outs)
    common = [t for t in range(len(probs)) if probs[t] * n >= 5]
    observed = [counts.get(t, 0) for t in common]
    expected = [float(probs[t]) * n for t in common]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    stat, pvalue = chi_square(observed, expected)
    assert len(common) >= 10
    assert pvalue > 1e-3, (stat, pvalue)


def chi_square(observed: list[int], expected: list[float]) -> tuple[float, float]:
    """(statistic, p-value): scipy's when installed, else Wilson–Hilferty's approximation."""
    try:
        from scipy.stats import chisquare
    except ImportError:
        import math

        stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
        k = len(observed) - 1
        z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
        return stat, 0.5 * math.erfc(z / math.sqrt(2))
    stat, pvalue = chisquare(observed, expected)
    return float(stat), float(pvalue)


def _reference_penalized_greedy(model_dir, prompt_ids, steps, f=0.0, p=0.0, r=1.0):
    """Greedy decoding with the documented penalty rules applied to HF's logits."""
    out: list[int] = []
    for _ in range(steps):
        logits = _hf_logits(model_dir, tuple(prompt_ids + out)).clone()
        for t in set(prompt_ids) | set(out):
            logits[t] = logits[t] / r if logits[t] > 0 else logits[t] * r
        for t, c in Counter(out).items():
            logits[t] -= f * c + p
        out.append(int(logits.argmax()))
        if out[-1] == 2:
            break
    return out


@pytest.mark.parametrize("penalty", [{"frequency_penalty": 1.0}, {"presence_penalty": 1.5},
                                     {"repetition_penalty": 1.5}, {"frequency_penalty": -1.0},
                                     {"repetition_penalty": 0.7}])
def test_penalties_follow_the_reference_and_their_direction(engine, model_dir, penalty):
    ids = _encode(model_dir, REPEAT_PROMPT)
    steps = 16
    base = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": steps})
    out = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": steps, **penalty})
    ref = _reference_penalized_greedy(model_dir, ids, steps, penalty.get("frequency_penalty", 0.0),
                                      penalty.get("presence_penalty", 0.0),
                                      penalty.get("repetition_penalty", 1.0))
    assert out["output_ids"] == ref

    def repeats(tokens):  # generated tokens already seen in prompt or output
        seen, n = set(ids), 0
        for t in tokens:
            n += t in seen
            seen.add(t)
        return n

    value = next(iter(penalty.values()))
    discourages = value > 1 if "repetition_penalty" in penalty else value > 0
    if discourages:
        assert repeats(out["output_ids"]) < repeats(base["output_ids"])
    else:
        assert repeats(out["output_ids"]) >= repeats(base["output_ids"])
        assert len(set(out["output_ids"])) <= len(set(base["output_ids"]))


def test_min_new_tokens_suppresses_eos_until_reached(engine):
    short = engine.generate(CHAT, {"temperature": 0, "max_new_tokens": 64})
    assert short["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}
    n = short["meta_info"]["completion_tokens"] + 10
    out = engine.generate(CHAT, {"temperature": 0, "max_new_tokens": 64, "min_new_tokens": n})
    assert out["meta_info"]["completion_tokens"] >= n
    assert 2 not in out["output_ids"][: n - 1]
    # Stop token ids are held back the same way.
    first = short["output_ids"][0]
    held = engine.generate(CHAT, {"temperature": 0, "max_new_tokens": 8, "min_new_tokens": 3,
                                  "stop_token_ids": [first]})
    assert held["output_ids"][0] != first


def test_stop_strings_never_leak_and_report_the_match(engine, model_dir):
    tok = _hf_model(model_dir)[1]
    full = engine.generate(PROMPT, {"temperature": 0, "max_new_tokens": 32})
    ids = full["output_ids"]
    # A stop string that starts inside one token and ends inside the next.
    texts = [tok.decode(ids[:i]) for i in range(len(ids) + 1)]

    def piece(i):
        return texts[i + 1][len(texts[i]):]

    k = next(i for i in range(2, len(ids) - 1) if len(piece(i)) >= 2 and len(piece(i + 1)) >= 2)
    stop = piece(k)[-1] + piece(k + 1)[:2]
    expected = full["text"][: full["text"].find(stop)]
    params = {"temperature": 0, "max_new_tokens": 32, "stop": [stop, "never-matches-xyz"]}
    out = engine.generate(PROMPT, params)
    assert out["text"] == expected and stop not in out["text"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    chunks = list(engine.generate(PROMPT, params, stream=True))
    streamed = "".join(c["text"] for c in chunks)
    assert streamed == expected
    assert all(stop not in "".join(c["text"] for c in chunks[:i + 1]) for i in range(len(chunks)))
    kept = engine.generate(PROMPT, {**params, "no_stop_trim": True})
    assert kept["text"].startswith(expected + stop)
    # stop_token_ids: finish on the id, report it, keep it out of the text.
    tid = ids[5]
    by_id = engine.generate(PROMPT, {"temperature": 0, "max_new_tokens": 32, "stop_token_ids": [tid]})
    assert by_id["meta_info"]["finish_reason"] == {"type": "stop", "matched": tid}
    assert by_id["output_ids"] == ids[: ids.index(tid) + 1]
    assert by_id["text"] == tok.decode(ids[: ids.index(tid)])


def test_n_4_returns_four_completions_over_one_prefill(engine):
    prompt = "In a quiet village by the sea, there lived an old fisherman who"
    engine.flush_cache()
    outs = engine.generate(prompt, {"temperature": 1.0, "max_new_tokens": 12, "n": 4, "seed": 5})
    assert len(outs) == 4
    plen = outs[0]["meta_info"]["prompt_tokens"]
    # The prompt was prefilled once; each sample reuses all but its last token.
    assert all(o["meta_info"]["cached_tokens"] == plen - 1 for o in outs)
    assert len({tuple(o["output_ids"]) for o in outs}) > 1
    again = engine.generate(prompt, {"temperature": 1.0, "max_new_tokens": 12, "n": 4, "seed": 5})
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in outs]


def test_custom_logit_processor_is_refused_unless_enabled(engine):
    from radixfleet.engine.sampling.custom_logit_processor import CustomLogitProcessor

    class Anything(CustomLogitProcessor):
        def __call__(self, logits, custom_param_list):
            return logits

    with pytest.raises(ValueError, match="enable_custom_logit_processor"):
        engine.generate(PROMPT, {"max_new_tokens": 2}, custom_logit_processor=Anything.to_str())
    assert engine.generate(PROMPT, {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_logit_bias_forces_a_token(engine, model_dir):
    tid = _encode(model_dir, " banana")[0]
    out = engine.generate(PROMPT, {"temperature": 0, "max_new_tokens": 3, "logit_bias": {str(tid): 100.0}})
    assert out["output_ids"] == [tid] * 3


def test_requests_finishing_in_their_prefill_step_release_kv(engine):
    """Regression: a request that finished in its prefill step (max_new_tokens=1, or the
    prefill-only request of n>1) never joined ``running`` and kept its req-table row, so
    the engine hung once 64 of them had run."""
    for _ in range(3):
        engine.generate(["Hello there"] * 40, {"max_new_tokens": 1})
    engine.generate("Hello there", {"max_new_tokens": 1, "n": 2})
    state = engine.get_server_info()["internal_states"][0]
    assert state["num_running_requests"] == 0 and state["kv_used_tokens"] == 0
