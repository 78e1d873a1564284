"""Sliding-window models through the Engine (torch_native, fp32, CPU) against HF transformers:
Mistral with ``sliding_window`` 8, Gemma 2 (alternating windows, soft caps), Gemma 3
(windows, local RoPE base) and Phi-3 (window 8, fused qkv/gate_up checkpoint). Prompts and
generations run far past the window; every greedy token equals transformers' and every
logprob is within 1e-4: alone, batched, reusing a radix-cached prefix, and with prefill
chunks of 5 tokens (chunk boundaries inside windows).
Also over 2 tensor-parallel ranks (gloo), and Gemma with a LoRA adapter on every projection
against peft's merged model."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import make_adapter, make_tiny_model

from radixfleet.engine.engine import Engine

ARCHS = ["mistral_sw", "gemma2", "gemma3", "phi3_sw"]
TOL = 1e-4
NEW = 20
_gen = torch.Generator().manual_seed(7)
PROMPTS = [torch.randint(1, 512, (n,), generator=_gen).tolist() for n in (6, 30, 19, 41)]
PARAMS = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}


@pytest.fixture(scope="module", params=ARCHS)
def folder(request, tmp_path_factory):
    return make_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))


@functools.lru_cache(maxsize=2)
def _hf(folder: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_reference(folder: str, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation and the logprob of each of its tokens."""
    model = _hf(folder)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                             pad_token_id=0)[0].tolist()
        lp = torch.log_softmax(model(torch.tensor([out])).logits[0].float(), -1)
    new = out[len(prompt):]
    return new, lp[len(prompt) - 1:-1].gather(1, torch.tensor(new)[:, None]).squeeze(1)


def check(folder: str, prompt: list[int], out: dict) -> None:
    ref_ids, ref_lp = hf_reference(folder, prompt)
    assert out["output_ids"] == ref_ids, f"prompt of {len(prompt)} tokens"
    got = torch.tensor([v for v, _, _ in out["meta_info"]["output_token_logprobs"]])
    assert (got - ref_lp).abs().max().item() < TOL


def run(engine: Engine, prompts: list[list[int]]) -> list[dict]:
    return engine.generate(input_ids=prompts, sampling_params=PARAMS, return_logprob=True)


def test_alone_batched_and_radix_reuse(folder):
    with Engine(model_path=folder, max_total_tokens=2048, skip_tokenizer_init=True) as engine:
        alone = run(engine, [PROMPTS[3]])[0]
        check(folder, PROMPTS[3], alone)
        for prompt, out in zip(PROMPTS[:3], run(engine, PROMPTS[:3]), strict=True):
            check(folder, prompt, out)
        # A continuation of the long prompt's conversation: its cached KV is reused.
        longer = PROMPTS[3] + alone["output_ids"] + PROMPTS[1][:9]
        out = run(engine, [longer])[0]
        assert out["meta_info"]["cached_tokens"] >= len(PROMPTS[3])
        check(folder, longer, out)


def test_chunked_prefill_across_windows(folder):
    with Engine(model_path=folder, max_total_tokens=2048, skip_tokenizer_init=True,
                chunked_prefill_size=5, disable_radix_cache=True) as engine:
        for prompt, out in zip(PROMPTS, run(engine, PROMPTS), strict=True):
            check(folder, prompt, out)


def test_tensor_parallel_2_ranks(folder):
    with Engine(model_path=folder, tp_size=2, max_total_tokens=2048, skip_tokenizer_init=True,
                chunked_prefill_size=16) as engine:
        for prompt, out in zip(PROMPTS[1:], run(engine, PROMPTS[1:]), strict=True):
            check(folder, prompt, out)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_lora_matches_the_merged_model(arch, tmp_path):
    pytest.importorskip("peft")
    folder = make_tiny_model(arch, str(tmp_path / arch))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    merged = make_adapter(folder, str(tmp_path / arch / "adapters" / "a"), 1, targets, 8)
    prompt = PROMPTS[2]
    with torch.no_grad():
        full = merged.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        lp = torch.log_softmax(merged(full).logits[0], -1)[len(prompt) - 1:-1]
    ref = full[0, len(prompt):]
    with Engine(model_path=folder, lora_paths=[f"a={tmp_path / arch / 'adapters' / 'a'}"],
                max_total_tokens=2048, skip_tokenizer_init=True) as engine:
        out = engine.generate(input_ids=[prompt], sampling_params=PARAMS, lora_path=["a"],
                              return_logprob=True)[0]
    assert out["output_ids"] == ref.tolist()
    got = torch.tensor([v for v, _, _ in out["meta_info"]["output_token_logprobs"]])
    assert (got - lp.gather(1, ref[:, None]).squeeze(1)).abs().max().item() < TOL


def test_gemma3_multimodal_checkpoint_serves_its_text_model(tmp_path):
    """A ``Gemma3ForConditionalGeneration`` folder (as Gemma 3 4B-27B ship): the text model's
    settings from ``text_config``, its weights from under ``language_model.``, the vision
    tower skipped; text prompts match transformers' multimodal model."""
    import transformers

    text = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=8,
                query_pre_attn_scalar=24, sliding_window_pattern=3, max_position_embeddings=512,
                rope_scaling={"rope_type": "linear", "factor": 4.0}, pad_token_id=0,
                eos_token_id=None, bos_token_id=None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=500, boi_token_index=498, eoi_token_index=499)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(str(tmp_path))
    prompt = PROMPTS[3]
    with torch.no_grad():
        full = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        lp = torch.log_softmax(model(full).logits[0].float(), -1)[len(prompt) - 1:-1]
    ref = full[0, len(prompt):]
    with Engine(model_path=str(tmp_path), max_total_tokens=2048, skip_tokenizer_init=True) as engine:
        out = run(engine, [prompt])[0]
    assert out["output_ids"] == ref.tolist()
    got = torch.tensor([v for v, _, _ in out["meta_info"]["output_token_logprobs"]])
    assert (got - lp.gather(1, ref[:, None]).squeeze(1)).abs().max().item() < TOL
