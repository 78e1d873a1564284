"""Model configs shipped for benchmarks with random weights (``load_format="dummy"``):
``llama-3.1-8b``, ``qwen3-8b``, the mixture of experts ``qwen3-30b-a3b`` (128 experts
of 768, top 8: 61 GB of bf16 weights, 6.1 GB read by a batch-1 decode step), and the
sliding-window models ``gemma-2-9b`` (4096-token windows on every other layer, soft caps)
and ``gemma-3-12b`` (1024-token windows on five layers of six; text model).
``config_dir(name)`` gives the folder to pass as ``model_path``."""

from __future__ import annotations

import os

NAMES = ("llama-3.1-8b", "qwen3-8b", "qwen3-30b-a3b", "gemma-2-9b", "gemma-3-12b")


def config_dir(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown shipped config {name!r}; choose from {', '.join(NAMES)}")
    return os.path.join(os.path.dirname(__file__), name)
