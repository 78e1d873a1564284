"""Fused triton kernels for the elementwise layers on CUDA (``radixfleet.kernels``).

On CPU, or where triton cannot be imported, layers use their plain torch code; on CUDA the
fused kernels cut a decode step's many tiny launches (RMSNorm + residual, rotary, SiLU-mul).
Imported lazily: CPU-only installs never load triton.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch


@functools.cache
def _ops() -> SimpleNamespace | None:
    if os.environ.get("RADIXFLEET_DISABLE_FUSED_KERNELS") == "1":
        return None
    try:
        from radixfleet.kernels.activation import silu_and_mul
        from radixfleet.kernels.gemv import gemv
        from radixfleet.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
        from radixfleet.kernels.rotary import apply_rotary_
    except ImportError:
        return None
    return SimpleNamespace(rmsnorm=rmsnorm, fused_add_rmsnorm=fused_add_rmsnorm,
                           apply_rotary_=apply_rotary_, silu_and_mul=silu_and_mul,
                           gemv=gemv if os.environ.get("RADIXFLEET_GEMV", "1") != "0" else None)


def fused_ops(x: torch.Tensor) -> SimpleNamespace | None:
    """The kernel namespace when ``x`` lives on CUDA and triton is available, else None."""
    return _ops() if x.is_cuda else None
