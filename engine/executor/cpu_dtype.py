"""What ``dtype="auto"`` means for a generation model on CPU.

bfloat16 where the CPU computes it natively (x86 AVX512_BF16 or AMX-BF16: oneDNN's bf16
matmuls then run at about twice the fp32 speed and stream half the weight bytes), float32
elsewhere (without those instructions bf16 is emulated and no faster). fp32 is always one
``dtype="float32"`` away and is the path with exact greedy parity with HF transformers in
fp32; ``RADIXFLEET_CPU_DTYPE`` changes what ``auto`` picks for every engine of a process tree.
"""

from __future__ import annotations

import functools

import torch

from radixfleet import env_vars

# /proc/cpuinfo flags of the instructions that make bf16 matmuls native.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not readable, e.g. macOS)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


@functools.cache
def native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def default_cpu_dtype() -> torch.dtype:
    """bfloat16 with native bf16 support, else float32; ``RADIXFLEET_CPU_DTYPE`` overrides."""
    choice = env_vars.CPU_DTYPE.get()
    if choice == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    if choice not in _CHOICES:
        raise ValueError(f"RADIXFLEET_CPU_DTYPE must be auto, float32 or bfloat16, got {choice!r}")
    return _CHOICES[choice]
