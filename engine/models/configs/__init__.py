"""Model configs shipped for benchmarks with random weights (``load_format="dummy"``):
``llama-3.1-8b`` and ``qwen3-8b``. ``config_dir(name)`` gives the folder to pass as
``model_path``."""

from __future__ import annotations

import os

NAMES = ("llama-3.1-8b", "qwen3-8b")


def config_dir(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown shipped config {name!r}; choose from {', '.join(NAMES)}")
    return os.path.join(os.path.dirname(__file__), name)
