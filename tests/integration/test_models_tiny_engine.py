"""Mixture-of-experts models (Qwen2-MoE with a shared expert and a dense layer, Qwen3-MoE,
Mixtral) and Phi-3 through the whole engine, against HF transformers (fp32, CPU) on tiny
random-weight models: greedy tokens identical and their logprobs within 1e-4 of HF's
teacher-forced ones, each prompt alone, all of them batched with chunked prefill, and again
with their prefixes taken from the radix cache. LoRA on a MoE model's attention matches
peft's merged model; adapters on its experts are refused. (``test_models_tiny.py`` checks
every position of one long prompt for every architecture.)"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import make_adapter, make_tiny_model

from radixfleet.engine.engine import Engine

ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "phi3"]
PROMPTS = [[5, 17, 99, 3, 250, 8, 41], list(range(10, 70)), [7] * 33 + [300, 12], [300, 301]]
NEW = 12
PARAMS = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}


@functools.lru_cache(maxsize=1)
def hf_model(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_greedy_and_logprobs(folder: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    """HF's greedy continuation, and its teacher-forced logprob of each generated token."""
    model = hf_model(folder)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             do_sample=False, pad_token_id=0)[0]
        logprobs = torch.log_softmax(model(out[None]).logits[0].float(), -1)
    tokens = out[len(prompt):]
    chosen = logprobs[len(prompt) - 1:-1].gather(-1, tokens[:, None])[:, 0]
    return tokens.tolist(), chosen.tolist()


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    folder = make_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))
    return request.param, folder, [hf_greedy_and_logprobs(folder, p) for p in PROMPTS]


def check(arch: str, outs: list[dict], refs: list[tuple[list[int], list[float]]]) -> None:
    for out, (tokens, logprobs) in zip(outs, refs, strict=True):
        assert out["output_ids"] == tokens, arch
        ours = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        assert ours == pytest.approx(logprobs, abs=1e-4), arch


def test_alone_batched_chunked_and_cached_match_hf(tiny):
    arch, folder, refs = tiny
    with Engine(model_path=folder, dtype="float32", max_total_tokens=2048, chunked_prefill_size=24,
                skip_tokenizer_init=True) as engine:
        alone = [engine.generate(input_ids=p, sampling_params=PARAMS, return_logprob=True) for p in PROMPTS]
        check(arch, alone, refs)
        engine.flush_cache()
        batched = engine.generate(input_ids=PROMPTS, sampling_params=PARAMS, return_logprob=True)
        check(arch, batched, refs)  # prompts longer than 24 tokens are prefilled in chunks
        assert all(o["meta_info"]["cached_tokens"] == 0 for o in batched)
        again = engine.generate(input_ids=PROMPTS, sampling_params=PARAMS, return_logprob=True)
        check(arch, again, refs)
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again[:3])  # radix cache reused


def test_lora_on_moe_attention_matches_peft_and_expert_adapters_are_refused(tmp_path):
    pytest.importorskip("peft")
    folder = make_tiny_model("qwen2_moe", str(tmp_path / "model"))  # layer 1 dense, 0 and 2 sparse
    merged = make_adapter(folder, str(tmp_path / "attn"), 1, ["q_proj", "v_proj", "o_proj"], 4)
    with torch.no_grad():
        ids = torch.tensor([PROMPTS[1]])
        ref = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                              pad_token_id=0)[0, ids.shape[1]:].tolist()
    # The shared experts', layer 1's and (peft >= 0.22: target_parameters) the experts' fused gate_up_proj.
    make_adapter(folder, str(tmp_path / "mlp"), 2, ["gate_proj", "up_proj"], 4)
    with Engine(model_path=folder, dtype="float32", lora_paths=[f"attn={tmp_path / 'attn'}"], max_total_tokens=2048,
                skip_tokenizer_init=True, allowed_local_paths=[str(tmp_path)]) as engine:
        base, lora = engine.generate(input_ids=[PROMPTS[1]] * 2, sampling_params=PARAMS, lora_path=[None, "attn"])
        assert lora["output_ids"] == ref
        assert base["output_ids"] == hf_greedy_and_logprobs(folder, PROMPTS[1])[0] != ref
        ok, message = engine.load_lora_adapter("mlp", str(tmp_path / "mlp"))
    assert not ok and "mixture-of-experts" in message, message
