"""Model configs shipped for benchmarks with random weights (``load_format="dummy"``):
``llama-3.1-8b``, ``qwen3-8b`` and the mixture of experts ``qwen3-30b-a3b`` (128 experts
of 768, top 8: 61 GB of bf16 weights, 6.1 GB read by a batch-1 decode step).
``config_dir(name)`` gives the folder to pass as ``model_path``."""

from __future__ import annotations

import os

NAMES = ("llama-3.1-8b", "qwen3-8b", "qwen3-30b-a3b")


def config_dir(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown shipped config {name!r}; choose from {', '.join(NAMES)}")
    return os.path.join(os.path.dirname(__file__), name)
