"""SiLU-and-mul: ``[T, 2I] → silu(x[:, :I]) * x[:, I:]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixfleet.engine.layers.fused import fused_ops


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(x)
        if ops is not None and x.dim() == 2 and x.stride(-1) == 1:
            return ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
