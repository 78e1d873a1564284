"""Test helpers shared by modules: prompts and HF transformers references."""

from __future__ import annotations

import functools

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "List three colors:",
    "The quick brown fox",
    "import numpy as np\n",
    "Q: What is 2 + 2?\nA:",
    "My favourite food is",
    "In 1492, Columbus",
    "Translate to French: Good morning.",
    "The weather today is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at",
    "SELECT * FROM users WHERE",
    "The three laws of robotics are",
]


@functools.lru_cache(maxsize=4)
def _hf_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def hf_greedy(path: str, prompt: str | list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by HF transformers (fp32), one prompt at a time (no padding)."""
    import torch

    model, tok = _hf_model(path)
    ids = tok(prompt, return_tensors="pt").input_ids if isinstance(prompt, str) else torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.eos_token_id or 0)
    return out[0, ids.shape[1]:].tolist()


TINY_ARCHS = {
    # name: (transformers config class name, extra config fields)
    "llama3": ("LlamaConfig", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64},
                               "rope_theta": 500000.0}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    # Sliding windows of 8 tokens (prompts and contexts in the tests run far past them);
    # soft caps small enough to change the logits (Gemma 2's real ones are 50 and 30).
    "mistral_sw": ("MistralConfig", {"sliding_window": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 32, "sliding_window": 8, "query_pre_attn_scalar": 24,
                                "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0,
                                "pad_token_id": 0}),
    # Layers: sliding, sliding, global; local RoPE base 500, global 1e6 with linear scaling.
    "gemma3": ("Gemma3TextConfig", {"head_dim": 32, "sliding_window": 8, "query_pre_attn_scalar": 24,
                                    "sliding_window_pattern": 3, "rope_local_base_freq": 500.0,
                                    "rope_scaling": {"rope_type": "linear", "factor": 4.0},
                                    "pad_token_id": 0}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    # Mixture of experts: 8 experts of 64, top 2 (Mixtral: 4 experts of the intermediate size).
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "shared_expert_intermediate_size": 96, "norm_topk_prob": False,
                                     "decoder_sparse_step": 1, "mlp_only_layers": [1]}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "norm_topk_prob": True, "head_dim": 32}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "phi3": ("Phi3Config", {"pad_token_id": None, "sliding_window": None}),
    "phi3_sw": ("Phi3Config", {"pad_token_id": None, "sliding_window": 8}),  # Phi-3 mini 4k has 2047
}


def make_tiny_model(arch: str, folder: str, dtype: str = "float32", std: float = 0.08,
                    router_std: float | None = None, **shape) -> str:
    """Save a tiny random-weight model of ``arch`` with transformers; return the folder.

    ``shape`` overrides the config's sizes (hidden_size, num_attention_heads, head_dim, ...).
    Matrices are drawn with ``std``: the default 0.08 gives peaked logits, so greedy runs
    rarely meet near-ties; 0.02 is transformers' own init. ``router_std``: the MoE routers'
    std instead (a large one makes routing decisive, as trained routers are: bf16 rounding
    then rarely swaps an expert)."""
    import torch
    import transformers

    cls_name, extra = TINY_ARCHS[arch]
    fields = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=None, bos_token_id=None, **extra)
    fields.update(shape)
    if fields.get("head_dim") is None:
        fields.pop("head_dim", None)
    config = getattr(transformers, cls_name)(**fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                router = router_std is not None and name.endswith(".gate.weight")
                p.normal_(0, router_std if router else std)
    model.save_pretrained(folder)
    return folder


def hf_teacher_forced_logprobs(folder: str, ids: list[int], dtype: str = "float32", device: str = "cpu"):
    """log-softmax of HF's logits at every position of ``ids`` ([T, V], fp32)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device)
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).logits[0].float()
    return torch.log_softmax(logits, -1).cpu()


def runner_teacher_forced_logprobs(runner, ids: list[int]):
    """Our ModelRunner's log-softmax at every position of ``ids`` (one extend step)."""
    import torch

    from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode

    n = len(ids)
    row = runner.req_table.alloc()
    slots = runner.allocator.alloc(n)
    runner.req_table.write(row, 0, slots)
    batch = ForwardBatch.from_host(ForwardMode.EXTEND, ids, [row], slots, runner.req_table.table, [0], [n])
    hidden = runner.forward(batch, sample_last_only=False)
    out = torch.log_softmax(runner.compute_logits(hidden), -1).cpu()
    runner.allocator.free(slots)
    runner.req_table.free(row)
    return out


def make_adapter(base: str, folder: str, seed: int, targets: list[str], rank: int, **extra):
    """A peft adapter with random A and B (peft's zero-B init would change nothing); returns
    the merged HF model as the reference."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                  init_lora_weights=False, lora_dropout=0.0, **extra))
    peft_model.save_pretrained(folder)
    return peft_model.merge_and_unload().eval()
