"""Logprobs and hidden states on a real engine, against HF transformers (fp32, CPU).

Logprobs are of the raw model distribution (log-softmax before temperature, penalties or
masks), SGLang's default; so even sampled tokens' logprobs equal HF's plain forward."""

from __future__ import annotations

import pytest
import torch
from helpers import _hf_model

from radixfleet.engine.engine import Engine

TOL = 1e-4
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_path=model_dir, max_total_tokens=8192) as e:
        yield e


def hf_logprobs(model_dir, ids):
    """[len(ids), V] log-softmax of HF logits at every position, plus the last hidden states."""
    model, _ = _hf_model(model_dir)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return torch.log_softmax(out.logits[0].float(), -1), out.hidden_states[-1][0].float()


def check_entries(entries, lp_rows, ids):
    """entries[i] = (logprob, token, text) for token ids[i], predicted by lp_rows[i]."""
    assert [t for _, t, _ in entries] == list(ids)
    expected = lp_rows.gather(1, torch.tensor(ids)[:, None]).squeeze(1)
    got = torch.tensor([v for v, _, _ in entries])
    assert torch.allclose(got, expected, atol=TOL), (got - expected).abs().max()


def check_tops(tops, lp_rows, k):
    for entry, row in zip(tops, lp_rows, strict=True):
        vals = [v for v, _, _ in entry]
        assert len(entry) == k and vals == sorted(vals, reverse=True)
        ref_vals, ref_ids = row.topk(k)
        assert torch.allclose(torch.tensor(vals), ref_vals, atol=TOL)
        # Ties aside, the same tokens in the same order.
        assert [t for _, t, _ in entry] == ref_ids.tolist() or torch.allclose(
            row[[t for _, t, _ in entry]], ref_vals, atol=TOL)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_input_and_output_logprobs_match_hf(engine, model_dir, temperature):
    k = 5
    # Batched with requests that ask for nothing, to check rows stay independent.
    prompts = PROMPTS + ["List three colors:"]
    outs = engine.generate(prompts, {"temperature": temperature, "max_new_tokens": 12, "seed": 3},
                           return_logprob=[True, True, True, False], logprob_start_len=0,
                           top_logprobs_num=k)
    assert "output_token_logprobs" not in outs[3]["meta_info"]
    tok = _hf_model(model_dir)[1]
    for prompt, out in zip(PROMPTS, outs, strict=False):
        meta = out["meta_info"]
        ids = tok.encode(prompt)
        full = ids + out["output_ids"]
        lp, _ = hf_logprobs(model_dir, full)
        L = len(ids)
        inp = meta["input_token_logprobs"]
        assert len(inp) == L and inp[0] == (None, ids[0], None)
        check_entries(inp[1:], lp[: L - 1], ids[1:])
        check_entries(meta["output_token_logprobs"], lp[L - 1:-1], out["output_ids"])
        assert meta["input_top_logprobs"][0] is None
        check_tops(meta["input_top_logprobs"][1:], lp[: L - 1], k)
        check_tops(meta["output_top_logprobs"], lp[L - 1:-1], k)
        if temperature == 0:  # greedy picks the top-1 token
            assert all(top[0][1] == t for top, t in zip(meta["output_top_logprobs"], out["output_ids"],
                                                        strict=True))


def test_logprob_start_len_text_and_streaming(engine, model_dir):
    tok = _hf_model(model_dir)[1]
    prompt = PROMPTS[2]
    ids = tok.encode(prompt)
    engine.generate(prompt, {"temperature": 0, "max_new_tokens": 4})  # the prompt is now cached
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 6}, return_logprob=True,
                          logprob_start_len=4, top_logprobs_num=2, return_text_in_logprobs=True)
    meta = out["meta_info"]
    lp, _ = hf_logprobs(model_dir, ids + out["output_ids"])
    check_entries(meta["input_token_logprobs"], lp[3:len(ids) - 1], ids[4:])
    for _, t, text in meta["input_token_logprobs"] + meta["output_token_logprobs"]:
        assert text == tok.decode([t])
    assert all(text == tok.decode([t]) for top in meta["output_top_logprobs"] for _, t, text in top)
    default = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 6}, return_logprob=True)
    # logprob_start_len = -1: the last prompt token only (SGLang's default).
    assert [t for _, t, _ in default["meta_info"]["input_token_logprobs"]] == ids[-1:]
    plain, texted = default["meta_info"]["output_token_logprobs"], meta["output_token_logprobs"]
    assert [(t, x) for _, t, x in plain] == [(t, None) for _, t, _ in texted]
    assert all(abs(a[0] - b[0]) < TOL for a, b in zip(plain, texted, strict=True))
    chunks = list(engine.generate(prompt, {"temperature": 0, "max_new_tokens": 6}, stream=True,
                                  return_logprob=True))
    last = chunks[-1]["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in last] == out["output_ids"]


def test_long_chunked_prompt_logprobs(model_dir):
    words = " ".join(f"w{i}" for i in range(150))
    prompt = f"Numbers: {words}. End."
    with Engine(model_path=model_dir, max_total_tokens=4096, chunked_prefill_size=64) as e:
        out = e.generate(prompt, {"temperature": 0, "max_new_tokens": 3}, return_logprob=True,
                         logprob_start_len=0)
    ids = _hf_model(model_dir)[1].encode(prompt)
    assert len(ids) > 200
    lp, _ = hf_logprobs(model_dir, ids + out["output_ids"])
    inp = out["meta_info"]["input_token_logprobs"]
    check_entries(inp[1:], lp[: len(ids) - 1], ids[1:])


def test_hidden_states_match_hf(engine, model_dir):
    prompt = PROMPTS[0]
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 4}, return_hidden_states=True)
    hs = out["meta_info"]["hidden_states"]
    ids = _hf_model(model_dir)[1].encode(prompt)
    _, ref = hf_logprobs(model_dir, ids + out["output_ids"])
    # SGLang's layout: the prompt's states, then one per decode step.
    assert len(hs) == 1 + len(out["output_ids"]) - 1
    assert torch.allclose(torch.tensor(hs[0]), ref[: len(ids)], atol=1e-3)
    for i, h in enumerate(hs[1:]):
        assert torch.allclose(torch.tensor(h), ref[len(ids) + i], atol=1e-3)
