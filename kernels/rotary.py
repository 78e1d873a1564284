"""Rotary position embedding applied in place to q and k (neox layout: rotate halves).

``build_cos_sin_cache`` builds the table the kernel reads: row p holds ``cos(p * inv_freq)``
then ``sin(p * inv_freq)``, with ``inv_freq`` as transformers computes it (fp32), including
``rope_type: llama3`` and ``linear`` scaling. Only the first ``rotary_dim`` (= the cache's
width) dims of each head rotate; the rest pass through.

Shapes (T tokens, H query heads, KVH kv heads, D head dim, P positions, R rotary dim <= D):
    positions      [T] int64
    q              [T, H, D]    model dtype, last dim contiguous, rotated in place
    k              [T, KVH, D]  model dtype, last dim contiguous, rotated in place
    cos_sin_cache  [P, R] fp32  (cos | sin)
Grid: (T,); one program rotates every head of one token.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(X, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_r < HALF)[None, :]
    p1 = X + offs_h[:, None] * stride_h + offs_r[None, :]
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos[None, :] - x2 * sin[None, :]).to(X.dtype.element_ty), mask=mask)
    tl.store(p2, (x2 * cos[None, :] + x1 * sin[None, :]).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    POS, Q, K, CACHE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < HALF
    cos = tl.load(CACHE + pos * stride_c + offs_r, mask=r_mask, other=0.0)
    sin = tl.load(CACHE + pos * stride_c + HALF + offs_r, mask=r_mask, other=0.0)
    _rotate_heads(Q + t * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HALF, BLOCK_HQ, BLOCK_R)
    _rotate_heads(K + t * stride_kt, stride_kh, cos, sin, NUM_K_HEADS, HALF, BLOCK_HK, BLOCK_R)


def apply_rotary_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  cos_sin_cache: torch.Tensor) -> None:
    """Rotate ``q`` [T, H, D] and ``k`` [T, KVH, D] in place at ``positions`` [T]."""
    T, H, D = q.shape
    KVH = k.shape[1]
    R = cos_sin_cache.shape[1]
    assert k.shape[0] == T and k.shape[2] == D and positions.shape == (T,)
    assert R % 2 == 0 and R <= D, f"rotary dim {R} must be even and <= head dim {D}"
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(1) == 1
    assert q.stride(2) == 1 and k.stride(2) == 1, "q/k last dim must be contiguous"
    if T == 0:
        return
    block_r = triton.next_power_of_2(R // 2)
    _rotary_kernel[(T,)](
        positions, q, k, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=H, NUM_K_HEADS=KVH, HALF=R // 2,
        BLOCK_HQ=triton.next_power_of_2(H), BLOCK_HK=triton.next_power_of_2(KVH), BLOCK_R=block_r,
        num_warps=4,
    )


def rope_inv_freq(rotary_dim: int, base: float,
                  rope_scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2] fp32, as transformers computes them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    scaling = rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3)")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_cos_sin_cache(rotary_dim: int, max_positions: int, base: float,
                        rope_scaling: dict[str, Any] | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """``[max_positions, rotary_dim]`` fp32: ``cos(p * inv_freq) | sin(p * inv_freq)``."""
    inv_freq = rope_inv_freq(rotary_dim, base, rope_scaling)
    freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
