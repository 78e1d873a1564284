"""Fused kernels for the elementwise layers (RMSNorm + residual, rotary, SiLU-mul) and the
batch-1 GEMV, chosen by the device of the data:

- CUDA: triton kernels (``radixfleet.kernels``), cutting a decode step's many tiny launches;
  imported lazily, so CPU-only installs never load triton. ``RADIXFLEET_DISABLE_FUSED_KERNELS=1``
  turns them off, ``RADIXFLEET_GEMV=0`` only the GEMVs. Only here: the batch-1 GEMVs with the
  RMSNorm or SiLU-mul before them folded in (``gemv_rmsnorm``, ``gemv_silu_mul``;
  ``RADIXFLEET_GEMV_FUSE=0`` keeps them separate), rotary with the KV-cache store
  (``rotary_store_kv_``), and the per-head q and k RMSNorms in one launch (``qk_rmsnorm``).
- CPU, fp32: the C kernels of ``kernels/cpu_ops.c``, which replace several small torch ops
  each (``RADIXFLEET_CPU_KERNELS=0`` turns them off; they are also off without a C compiler).

Both sets have the same signatures. Where neither applies, layers run their plain torch code.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from radixfleet import env_vars
from radixfleet.kernels import cpu_ops


@functools.cache
def _triton_ops() -> SimpleNamespace | None:
    if env_vars.DISABLE_FUSED_KERNELS.get():
        return None
    try:
        from radixfleet.kernels.activation import silu_and_mul
        from radixfleet.kernels.gemv import gemv, gemv_rmsnorm, gemv_silu_mul
        from radixfleet.kernels.qk_norm import qk_rmsnorm
        from radixfleet.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
        from radixfleet.kernels.rotary import apply_rotary_, rotary_store_kv_
    except ImportError:
        return None
    use_gemv = env_vars.GEMV.get()
    fuse = use_gemv and env_vars.GEMV_FUSE.get()
    return SimpleNamespace(rmsnorm=rmsnorm, fused_add_rmsnorm=fused_add_rmsnorm,
                           apply_rotary_=apply_rotary_, silu_and_mul=silu_and_mul,
                           gemv=gemv if use_gemv else None,
                           gemv_rmsnorm=gemv_rmsnorm if fuse else None,
                           gemv_silu_mul=gemv_silu_mul if fuse else None,
                           rotary_store_kv_=rotary_store_kv_, qk_rmsnorm=qk_rmsnorm)


_CPU_OPS = SimpleNamespace(rmsnorm=cpu_ops.rmsnorm, fused_add_rmsnorm=cpu_ops.fused_add_rmsnorm,
                           apply_rotary_=cpu_ops.apply_rotary_, silu_and_mul=cpu_ops.silu_and_mul,
                           gemv=None, gemv_rmsnorm=None, gemv_silu_mul=None, rotary_store_kv_=None,
                           qk_rmsnorm=None)


def fused_ops(x: torch.Tensor) -> SimpleNamespace | None:
    """The kernel namespace for ``x``'s device and dtype, or None (use plain torch)."""
    if x.is_cuda:
        return _triton_ops()
    return _CPU_OPS if cpu_ops.usable(x) else None
