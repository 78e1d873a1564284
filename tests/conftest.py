"""Shared fixtures: the default model folder and HF transformers references on it."""

from __future__ import annotations

import os

import pytest
from helpers import PROMPTS, hf_greedy

import radixfleet  # noqa: F401  (before transformers: takes the checkout root off sys.path)

# On a CPU with native bf16 the engine's default dtype is bf16; the tests compare greedy
# output with HF transformers in fp32 exactly, so they run the fp32 path unless told otherwise
# (engine processes and servers inherit this). tests/integration/test_cpu_bf16.py checks the
# bf16 default and bounds its accuracy.
os.environ.setdefault("RADIXFLEET_CPU_DTYPE", "float32")


@pytest.fixture(scope="session")
def model_dir() -> str:
    from radixfleet.engine.models.model_prep import prepare_default_model

    return str(prepare_default_model())


@pytest.fixture(scope="session")
def hf_reference(model_dir):
    """Greedy HF continuations of PROMPTS, 32 new tokens each (computed once per session)."""
    return [hf_greedy(model_dir, p, 32) for p in PROMPTS]
