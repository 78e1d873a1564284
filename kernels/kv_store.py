"""Write the new tokens' keys and values into the token-slot KV cache.

Shapes (T new tokens, KVH kv heads, D head dim, S slots):
    k, v              [T, KVH, D]    model dtype, last dim contiguous (may be views of a qkv)
    k_buffer/v_buffer [S, KVH, D]    model dtype, last dim contiguous
    loc               [T] int64      destination slot of each token
Grid: (T,); one program copies one token's k and v rows (all kv heads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def copy_heads(SRC, stride_src, DST, stride_dst, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Copy one token's ``[NUM_HEADS, HEAD_DIM]`` rows (head stride given, dims contiguous)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(SRC + offs_h[:, None] * stride_src + offs_d[None, :], mask=mask)
    tl.store(DST + offs_h[:, None] * stride_dst + offs_d[None, :], x, mask=mask)


@triton.jit
def _store_kv_kernel(
    K, V, K_BUF, V_BUF, LOC,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kbn, stride_kbh, stride_vbn, stride_vbh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    loc = tl.load(LOC + t).to(tl.int64)
    copy_heads(K + t * stride_kt, stride_kh, K_BUF + loc * stride_kbn, stride_kbh, NUM_KV_HEADS,
               HEAD_DIM, BLOCK_H, BLOCK_D)
    copy_heads(V + t * stride_vt, stride_vh, V_BUF + loc * stride_vbn, stride_vbh, NUM_KV_HEADS,
               HEAD_DIM, BLOCK_H, BLOCK_D)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
             loc: torch.Tensor) -> None:
    """``k_buffer[loc] = k; v_buffer[loc] = v`` in one launch (shapes in the module docstring)."""
    T, KVH, D = k.shape
    assert v.shape == k.shape and k_buffer.shape[1:] == (KVH, D) and v_buffer.shape == k_buffer.shape
    assert k.dtype == k_buffer.dtype and v.dtype == v_buffer.dtype, "cast k/v to the cache dtype first"
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1
    if T == 0:
        return
    block_h, block_d = triton.next_power_of_2(KVH), triton.next_power_of_2(D)
    _store_kv_kernel[(T,)](
        k, v, k_buffer, v_buffer, loc,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        NUM_KV_HEADS=KVH, HEAD_DIM=D, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )
