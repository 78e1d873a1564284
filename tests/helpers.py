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
