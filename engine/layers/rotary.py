"""Rotary position embedding (neox layout: rotate halves), with Llama-3 and linear scaling."""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn

from radixfleet.engine.layers.fused import fused_ops


def _inv_freq_default(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _inv_freq_llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = _inv_freq_default(head_dim, theta)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind == "llama3":
        inv_freq = _inv_freq_llama3(inv_freq, scaling)  # type: ignore[arg-type]
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]  # type: ignore[index]
    elif kind is not None:
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: llama3, linear)")
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None = None):
        super().__init__()
        inv_freq = build_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self._step_positions: torch.Tensor | None = None
        self._step_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T]; q [T, H, D], k [T, KVH, D] → rotated (q, k)."""
        ops = fused_ops(q)
        if ops is not None and q.stride(-1) == 1 and k.stride(-1) == 1:
            ops.apply_rotary_(positions, q, k, self._packed_cos_sin())  # in place
            return q, k
        # Every layer of a step rotates at the same positions: look cos/sin up once per step.
        if self._step_positions is not positions:
            self._step_positions = positions
            self._step_cos_sin = (self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        cos, sin = self._step_cos_sin  # [T, 1, D/2] each
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def fused_table(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """The cos/sin table for ``kernels/rotary.py``'s rotary + KV store, when that kernel
        runs on ``q``'s device and layout; None otherwise."""
        ops = fused_ops(q)
        if ops is None or ops.rotary_store_kv_ is None or q.stride(-1) != 1 or k.stride(-1) != 1:
            return None
        return self._packed_cos_sin()

    def _packed_cos_sin(self) -> torch.Tensor:
        """``[P, D]`` fp32: cos of the D/2 frequencies, then sin (the fused kernels' table)."""
        if getattr(self, "_cos_sin", None) is None:
            self._cos_sin = torch.cat([self.cos, self.sin], dim=-1).contiguous()
        return self._cos_sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    # fp32: written into one output, 4 kernels instead of 7 (addcmul may fuse the multiply-add,
    # so results can differ from the unfused form in the last bit).
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


_SHARED: dict[tuple, RotaryEmbedding] = {}


def get_rope(head_dim: int, max_positions: int, theta: float,
             scaling: dict[str, Any] | None) -> RotaryEmbedding:
    """One cos/sin cache per configuration and device, shared by every layer (a 128k-context
    cache is ~64 MB; one per layer would waste gigabytes)."""
    key = (head_dim, max_positions, theta, json.dumps(scaling, sort_keys=True),
           str(torch.get_default_device()))
    if key not in _SHARED:
        _SHARED[key] = RotaryEmbedding(head_dim, max_positions, theta, scaling)
    return _SHARED[key]
