"""Write the new tokens' keys and values into the token-slot KV cache.

Shapes (T new tokens, KVH kv heads, D head dim, S slots):
    k, v              [T, KVH, D]    model dtype, last dim contiguous (may be views of a qkv)
    k_buffer/v_buffer [S, KVH, D]    model dtype, or fp8 e4m3 (an fp8 KV cache), last dim contiguous
    loc               [T] int64      destination slot of each token
An fp8 cache stores ``clamp(k / k_scale, ±448)`` (likewise v), rounded to nearest; readers
multiply back by the scale (``kernels/attention_tile.py``).
Grid: (T,); one program copies one token's k and v rows (all kv heads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def to_cache(x, inv_scale, QUANT: tl.constexpr):
    """``x`` as the cache stores it: with QUANT (an fp8 cache), fp32 ``x * inv_scale``
    clamped to the e4m3 range (the caller's store rounds it to fp8)."""
    if QUANT:
        x = tl.clamp(x.to(tl.float32) * inv_scale, -448.0, 448.0)
    return x


@triton.jit
def copy_heads(SRC, stride_src, DST, stride_dst, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, inv_scale, QUANT: tl.constexpr):
    """Copy one token's ``[NUM_HEADS, HEAD_DIM]`` rows (head stride given, dims contiguous);
    with QUANT, scaled by ``inv_scale`` into an fp8 destination."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(SRC + offs_h[:, None] * stride_src + offs_d[None, :], mask=mask)
    x = to_cache(x, inv_scale, QUANT)
    tl.store(DST + offs_h[:, None] * stride_dst + offs_d[None, :], x.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(
    K, V, K_BUF, V_BUF, LOC, k_inv_scale, v_inv_scale,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kbn, stride_kbh, stride_vbn, stride_vbh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    loc = tl.load(LOC + t).to(tl.int64)
    copy_heads(K + t * stride_kt, stride_kh, K_BUF + loc * stride_kbn, stride_kbh, NUM_KV_HEADS,
               HEAD_DIM, BLOCK_H, BLOCK_D, k_inv_scale, QUANT)
    copy_heads(V + t * stride_vt, stride_vh, V_BUF + loc * stride_vbn, stride_vbh, NUM_KV_HEADS,
               HEAD_DIM, BLOCK_H, BLOCK_D, v_inv_scale, QUANT)


def check_cache_dtype(k: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> bool:
    """Whether the cache is fp8 (else it must be in k's dtype)."""
    quant = k_buffer.dtype == torch.float8_e4m3fn
    assert v_buffer.dtype == k_buffer.dtype
    assert quant or k.dtype == k_buffer.dtype, "cast k/v to the cache dtype first"
    return quant


def store_kv(k: torch.Tensor, v: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
             loc: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """``k_buffer[loc] = k; v_buffer[loc] = v`` in one launch (shapes in the module docstring);
    into an fp8 cache, ``k / k_scale`` and ``v / v_scale``."""
    T, KVH, D = k.shape
    assert v.shape == k.shape and k_buffer.shape[1:] == (KVH, D) and v_buffer.shape == k_buffer.shape
    assert v.dtype == k.dtype
    quant = check_cache_dtype(k, k_buffer, v_buffer)
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1
    if T == 0:
        return
    block_h, block_d = triton.next_power_of_2(KVH), triton.next_power_of_2(D)
    _store_kv_kernel[(T,)](
        k, v, k_buffer, v_buffer, loc, 1.0 / k_scale, 1.0 / v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        NUM_KV_HEADS=KVH, HEAD_DIM=D, BLOCK_H=block_h, BLOCK_D=block_d, QUANT=quant,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )
