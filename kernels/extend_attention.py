"""Extend (prefill / chunked prefill) attention over the token-slot KV layout, GQA.

Each request's new tokens attend to its cached prefix and, causally, to the new tokens
themselves. The new tokens' k/v must already be stored in the cache (the backend stores
them first), so the kernel reads every key and value through ``req_to_token``: the query at
extend index i of request b (absolute position ``prefix_b + i``) sees context slots
``req_to_token[req_b, 0 : prefix_b + i + 1]``.

Sliding window ``window`` (``None`` = whole context): query position p sees keys
``p - window + 1 .. p`` only; the loop starts at the tile holding the block's lowest visible
key, masks the tiles along the window's lower edge and along the diagonal, and runs the
tiles every row sees whole without masks. ``logit_cap`` soft-caps the scaled logits (Gemma 2).

Grid: (cdiv(max_extend_len, BLOCK_M), B, H); one program computes a BLOCK_M tile of one
request's queries for one query head, flash-attention style (online softmax, fp32 state).

Shapes (T packed new tokens, B requests, H query heads, KVH kv heads, D head dim):
    q                 [T, H, D]      model dtype, requests packed back to back
    k_buffer/v_buffer [S, KVH, D]    model dtype or fp8 e4m3 (times k_scale / v_scale), last dim contiguous
    req_to_token      [R, L] int32   (last dim contiguous)
    req_pool_indices  [B] int64
    q_start           [B] int32      offset of each request's first new token in q
    prefix_lens       [B] int32      cached tokens before this step
    extend_lens       [B] int32      new tokens (sum = T)
    out               [T, H, D]      model dtype
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixfleet.kernels import dot_precision
from radixfleet.kernels.attention_tile import attend_tile

_LOG2E = 1.4426950408889634


@triton.jit
def _extend_kernel(
    Q, K, V, OUT, REQ_TO_TOKEN, REQ_IDX, Q_START, PREFIX_LENS, EXTEND_LENS,
    sm_scale_log2, v_scale, window, cap_log2,
    stride_qt, stride_qh,
    stride_kn, stride_kh,
    stride_vn, stride_vh,
    stride_ot, stride_oh,
    stride_rt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    mblk = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    ext_len = tl.load(EXTEND_LENS + b)
    if mblk * BLOCK_M >= ext_len:
        return
    kvh = h // GROUP
    prefix = tl.load(PREFIX_LENS + b)
    q_start = tl.load(Q_START + b).to(tl.int64)
    req = tl.load(REQ_IDX + b).to(tl.int64)

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)  # extend index within the request
    m_mask = offs_m < ext_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_rows = q_start + offs_m
    q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    q_pos = prefix + offs_m  # absolute position of each query row

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    row = REQ_TO_TOKEN + req * stride_rt
    # Keys past the tile's last query position are masked for every row: stop there.
    kv_end = prefix + tl.minimum((mblk + 1) * BLOCK_M, ext_len)
    # Whole tiles below the tile's first query position need no mask: a mask-free loop
    # (which the compiler pipelines), then the causal tiles along the diagonal.
    full_end = (prefix + mblk * BLOCK_M) // BLOCK_N * BLOCK_N
    start = 0
    if WINDOWED:
        # From the tile of the block's lowest visible key: masked tiles along the window's
        # lower edge, up to the first tile that every row sees whole (keys >= kv_end - window).
        start = tl.maximum(prefix + mblk * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
        edge_end = tl.minimum(tl.cdiv(tl.maximum(kv_end - window, 0), BLOCK_N) * BLOCK_N, full_end)
        for n0 in range(start, edge_end, BLOCK_N):
            acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, q_pos, row, k_base, v_base, stride_kn,
                                        stride_vn, n0, kv_end, offs_d, d_mask, sm_scale_log2,
                                        window, cap_log2, BLOCK_N, True, True, HEAD_DIM == BLOCK_D,
                                        PRECISION, True, SOFTCAP)
        start = edge_end
    for n0 in range(start, full_end, BLOCK_N):
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, q_pos, row, k_base, v_base, stride_kn,
                                    stride_vn, n0, kv_end, offs_d, d_mask, sm_scale_log2,
                                    window, cap_log2, BLOCK_N, False, False,
                                    HEAD_DIM == BLOCK_D, PRECISION, False, SOFTCAP)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, q_pos, row, k_base, v_base, stride_kn,
                                    stride_vn, n0, kv_end, offs_d, d_mask, sm_scale_log2,
                                    window, cap_log2, BLOCK_N, True, True, HEAD_DIM == BLOCK_D,
                                    PRECISION, WINDOWED, SOFTCAP)

    o = acc / l_i[:, None] * v_scale
    tl.store(OUT + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(OUT.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def default_extend_config(head_dim: int, max_extend_len: int, device: torch.device,
                          dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), from the H100 sweep in benchmarks/kernel_bench.py.

    Long extends: 128-row tiles, 3 stages (289-342 TFLOP/s at head dim 128). Short ones
    (<= 1024 new tokens per request): 64-row tiles, for more programs on the SMs. fp32
    (a correctness mode, not tuned): 64 x 32 tiles, 2 stages, within shared memory at
    head dim 256.
    """
    if device.type != "cuda":
        return 16, 16, 4, 1  # interpreter: small tiles keep CPU runs fast
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if max_extend_len <= 1024:
        return 64, 64, 4, 2
    return 128, 64, 4, 3


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    q_start: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    max_extend_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    window: int | None = None,
    logit_cap: float | None = None,
) -> torch.Tensor:
    """Causal attention of the packed new tokens ``q`` [T, H, D] over their contexts → [T, H, D]
    (each query over its last ``window`` positions with a sliding window).

    ``max_extend_len`` (a host int, >= every entry of ``extend_lens``) sizes the grid;
    ``config`` overrides (BLOCK_M, BLOCK_N, num_warps, num_stages).
    """
    T, H, D = q.shape
    KVH = k_buffer.shape[1]
    B = req_pool_indices.shape[0]
    assert H % KVH == 0, f"num_heads {H} is not a multiple of num_kv_heads {KVH}"
    assert k_buffer.shape[2] == D and v_buffer.shape == k_buffer.shape, "k/v buffer shape mismatch"
    assert q.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1
    assert req_to_token.stride(1) == 1, "req_to_token rows must be contiguous"
    if out is None:
        out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    block_m, block_n, num_warps, num_stages = config or default_extend_config(D, max_extend_len, q.device, q.dtype)
    grid = (triton.cdiv(max_extend_len, block_m), B, H)
    _extend_kernel[grid](
        q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, q_start, prefix_lens,
        extend_lens,
        scale * k_scale * _LOG2E, v_scale, window or 0, (logit_cap or 0.0) * _LOG2E,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        out.stride(0), out.stride(1),
        req_to_token.stride(0),
        GROUP=H // KVH, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=block_m,
        BLOCK_N=block_n, PRECISION=dot_precision(q.dtype), WINDOWED=window is not None,
        SOFTCAP=logit_cap is not None, num_warps=num_warps, num_stages=num_stages,
    )
    return out
