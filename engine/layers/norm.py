"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from radixfleet import env_vars
from radixfleet.engine.layers.fused import fused_ops


class RMSNorm(nn.Module):
    # The fused kernels scale by ``weight`` itself; a subclass with other arithmetic (Gemma's
    # ``1 + weight`` in fp32) sets this False so that ``qk_norms`` calls its ``forward``.
    fusable = True

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # torch's fused kernel: the same arithmetic as below in one op (bit-identical on CPU).
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Computed in fp32 as transformers does, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``residual is None``: return norm(x). Else return (norm(x + residual), x + residual)."""
        if residual is None and x.dim() == 3 and x.is_cuda:
            # Per-head norms [T, H, D]: one kernel over T*H rows, not ~7 torch ops.
            return self(x.reshape(-1, x.shape[-1])).view(x.shape)
        ops = fused_ops(x) if x.dim() == 2 and x.stride(-1) == 1 else None
        if ops is not None:
            if residual is None:
                return ops.rmsnorm(x, self.weight, self.eps)
            return ops.fused_add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


def fusable_qk_norms(q_norm: RMSNorm, k_norm: RMSNorm, full_rotary: bool) -> bool:
    """Whether the per-head q/k norms can run inside the rotary + KV-store kernel
    (``kernels/rotary.py``): plain RMSNorms with one eps, and rotary over the whole head."""
    return (full_rotary and q_norm.fusable and k_norm.fusable and q_norm.eps == k_norm.eps
            and env_vars.FUSE_QK_NORM_ROTARY.get())


def qk_norms(q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm):
    """``(q_norm(q), k_norm(k))`` for per-head norms (Qwen3): q [T, H, D], k [T, KVH, D]; on
    CUDA one kernel for both (``kernels/qk_norm.py``)."""
    ops = fused_ops(q) if q.is_cuda and q_norm.fusable and k_norm.fusable else None
    if (ops is not None and ops.qk_rmsnorm is not None and q_norm.eps == k_norm.eps
            and q.stride()[1:] == (q.shape[2], 1) and k.stride()[1:] == (k.shape[2], 1)):
        return ops.qk_rmsnorm(q, k, q_norm.weight, k_norm.weight, q_norm.eps)
    return q_norm(q), k_norm(k)
