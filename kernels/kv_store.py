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
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(K_BUF + loc * stride_kbn + offs_h[:, None] * stride_kbh + offs_d[None, :], k, mask=mask)
    tl.store(V_BUF + loc * stride_vbn + offs_h[:, None] * stride_vbh + offs_d[None, :], v, mask=mask)


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
