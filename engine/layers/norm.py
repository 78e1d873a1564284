"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from radixfleet.engine.layers.fused import fused_ops


class RMSNorm(nn.Module):
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
            # Per-head q/k norms (Qwen3) [T, H, D]: one kernel over T*H rows, not ~7 torch ops.
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
