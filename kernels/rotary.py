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
Grid: (T,); one program rotates every head of one token. ``rotary_store_kv_`` also writes the
rotated k and the v of each token to its KV-cache slot (one launch instead of two), and can
apply Qwen3's per-head q/k RMSNorms first (one launch instead of three).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from radixfleet.kernels.kv_store import check_cache_dtype, copy_heads, to_cache
from radixfleet.kernels.pdl import pdl_start, use_pdl


@triton.jit
def _normed(x, rstd, W, offs, mask, dtype):
    """``x`` (fp32) normalised and weighted, rounded as ``kernels/qk_norm.py`` rounds it."""
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    return ((x * rstd[:, None]).to(dtype).to(tl.float32) * w[None, :]).to(dtype).to(tl.float32)


@triton.jit
def _rotate_heads(SRC, stride_src, DST, stride_dst, cos, sin, NUM_HEADS: tl.constexpr,
                  HALF: tl.constexpr, HEAD_DIM: tl.constexpr, COPY_REST: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_REST: tl.constexpr,
                  inv_scale, QUANT: tl.constexpr, NORM_W, eps, NORM: tl.constexpr):
    """Rotate the heads of one token from SRC into DST (may be SRC); with COPY_REST also copy
    the dims past the rotary dim (partial rotary into a separate destination). QUANT: DST is
    an fp8 cache, written scaled by ``inv_scale`` (``kv_store.to_cache``). NORM (full rotary
    only): each head is RMS-normalised and weighted by ``NORM_W`` [HEAD_DIM] first (Qwen3's
    q/k norms)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_r < HALF)[None, :]
    src = SRC + offs_h[:, None] * stride_src + offs_r[None, :]
    dst = DST + offs_h[:, None] * stride_dst + offs_r[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        dtype = SRC.dtype.element_ty
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)
        r_ok = offs_r < HALF
        x1 = _normed(x1, rstd, NORM_W, offs_r, r_ok, dtype)
        x2 = _normed(x2, rstd, NORM_W + HALF, offs_r, r_ok, dtype)
    y1 = to_cache(x1 * cos[None, :] - x2 * sin[None, :], inv_scale, QUANT)
    y2 = to_cache(x2 * cos[None, :] + x1 * sin[None, :], inv_scale, QUANT)
    tl.store(dst, y1.to(DST.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(DST.dtype.element_ty), mask=mask)
    if COPY_REST:
        offs_x = 2 * HALF + tl.arange(0, BLOCK_REST)
        rest = (offs_h < NUM_HEADS)[:, None] & (offs_x < HEAD_DIM)[None, :]
        x = to_cache(tl.load(SRC + offs_h[:, None] * stride_src + offs_x[None, :], mask=rest),
                     inv_scale, QUANT)
        tl.store(DST + offs_h[:, None] * stride_dst + offs_x[None, :], x.to(DST.dtype.element_ty),
                 mask=rest)


@triton.jit
def _rotary_kernel(
    POS, Q, K, CACHE, V, K_BUF, V_BUF, LOC, k_inv_scale, v_inv_scale, WQ, WK, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
    stride_vt, stride_vh, stride_kbn, stride_kbh, stride_vbn, stride_vbh,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    STORE_KV: tl.constexpr,
    QUANT: tl.constexpr,
    NORM: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pdl_start(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < HALF
    cos = tl.load(CACHE + pos * stride_c + offs_r, mask=r_mask, other=0.0)
    sin = tl.load(CACHE + pos * stride_c + HALF + offs_r, mask=r_mask, other=0.0)
    q = Q + t * stride_qt
    _rotate_heads(q, stride_qh, q, stride_qh, cos, sin, NUM_Q_HEADS, HALF, HEAD_DIM, False,
                  BLOCK_HQ, BLOCK_R, BLOCK_D, 1.0, False, WQ, eps, NORM)
    k = K + t * stride_kt
    if STORE_KV:  # rotated k and plain v go straight to the token's cache slot
        loc = tl.load(LOC + t).to(tl.int64)
        _rotate_heads(k, stride_kh, K_BUF + loc * stride_kbn, stride_kbh, cos, sin, NUM_K_HEADS,
                      HALF, HEAD_DIM, 2 * HALF < HEAD_DIM, BLOCK_HK, BLOCK_R, BLOCK_D, k_inv_scale,
                      QUANT, WK, eps, NORM)
        copy_heads(V + t * stride_vt, stride_vh, V_BUF + loc * stride_vbn, stride_vbh, NUM_K_HEADS,
                   HEAD_DIM, BLOCK_HK, BLOCK_D, v_inv_scale, QUANT)
    else:
        _rotate_heads(k, stride_kh, k, stride_kh, cos, sin, NUM_K_HEADS, HALF, HEAD_DIM, False,
                      BLOCK_HK, BLOCK_R, BLOCK_D, 1.0, False, WK, eps, NORM)


def _check(positions, q, k, cos_sin_cache) -> None:
    T, H, D = q.shape
    R = cos_sin_cache.shape[1]
    assert k.shape[0] == T and k.shape[2] == D and positions.shape == (T,)
    assert R % 2 == 0 and R <= D, f"rotary dim {R} must be even and <= head dim {D}"
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(1) == 1
    assert q.stride(2) == 1 and k.stride(2) == 1, "q/k last dim must be contiguous"


def _launch(positions, q, k, cos_sin_cache, v=None, k_buffer=None, v_buffer=None, loc=None,
            k_scale: float = 1.0, v_scale: float = 1.0, quant: bool = False, qk_norm=None) -> None:
    T, H, D = q.shape
    KVH, R = k.shape[1], cos_sin_cache.shape[1]
    if T == 0:
        return
    store = v is not None
    v, k_buffer, v_buffer, loc = (v, k_buffer, v_buffer, loc) if store else (k, k, k, positions)
    wq, wk, eps = qk_norm if qk_norm is not None else (q, q, 0.0)
    _rotary_kernel[(T,)](
        positions, q, k, cos_sin_cache, v, k_buffer, v_buffer, loc, 1.0 / k_scale, 1.0 / v_scale,
        wq, wk, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        v.stride(0), v.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        NUM_Q_HEADS=H, NUM_K_HEADS=KVH, HALF=R // 2, HEAD_DIM=D, STORE_KV=store, QUANT=quant,
        NORM=qk_norm is not None,
        USE_PDL=use_pdl(q), launch_pdl=use_pdl(q),
        BLOCK_HQ=triton.next_power_of_2(H), BLOCK_HK=triton.next_power_of_2(KVH),
        BLOCK_R=triton.next_power_of_2(R // 2), BLOCK_D=triton.next_power_of_2(D),
        num_warps=4,
    )


def apply_rotary_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  cos_sin_cache: torch.Tensor) -> None:
    """Rotate ``q`` [T, H, D] and ``k`` [T, KVH, D] in place at ``positions`` [T]."""
    _check(positions, q, k, cos_sin_cache)
    _launch(positions, q, k, cos_sin_cache)


def rotary_store_kv_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos_sin_cache: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                     loc: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0,
                     qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> None:
    """Rotate ``q`` in place, and write rotated ``k`` and ``v`` [T, KVH, D] to the cache slots
    ``loc`` [T] of ``k_buffer``/``v_buffer`` [S, KVH, D] (``k`` itself is left unrotated):
    ``apply_rotary_`` then ``kv_store.store_kv`` in one launch (an fp8 cache gets ``k / k_scale``
    and ``v / v_scale``). ``qk_norm = (wq, wk, eps)`` (full rotary only): q and k are first
    RMS-normalised per head and weighted, as ``kernels/qk_norm.py`` does, in the same launch
    (``q`` then holds the normalised, rotated q)."""
    _check(positions, q, k, cos_sin_cache)
    if qk_norm is not None:
        assert cos_sin_cache.shape[1] == q.shape[2], "q/k norms fuse with full rotary only"
        assert qk_norm[0].shape == qk_norm[1].shape == (q.shape[2],)
    assert v.shape == k.shape and v.stride(2) == 1 and loc.shape == positions.shape
    assert k_buffer.shape[1:] == k.shape[1:] and v_buffer.shape == k_buffer.shape
    quant = check_cache_dtype(k, k_buffer, v_buffer)
    assert k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1
    _launch(positions, q, k, cos_sin_cache, v, k_buffer, v_buffer, loc, k_scale, v_scale, quant, qk_norm)


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
