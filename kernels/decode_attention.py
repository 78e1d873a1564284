"""Paged decode attention over the token-slot KV layout (page size 1), GQA, split-K, one launch.

One query token per request attends to the slots ``req_to_token[req, :seq_len]``. Flash-decoding
style: the context of each request is split into ``num_kv_splits`` chunks and one program per
(request, kv head, chunk) computes the softmax-normalised partial output of the kv head's
whole GQA group together with its log-sum-exp. The last program of each (request, kv head) to
finish, found through an atomic counter, merges the chunks: no second launch, which at batch
1 cost as much as the attention itself. The chunk length is derived on the device from
``seq_lens``, so the grid depends only on the batch size and the split count: the launch is
CUDA-graph safe.

Sliding window ``window`` (a runtime int; ``None`` = whole context): the query (position
``seq_len - 1``) sees the last ``window`` slots only, so the chunks split those. ``logit_cap``
soft-caps the scaled logits (``cap * tanh(s / cap)``, Gemma 2).

Shapes (B requests, H query heads, KVH kv heads, D head dim, S slots, R table rows):
    q                 [B, H, D]       model dtype
    k_buffer/v_buffer [S, KVH, D]     model dtype or fp8 e4m3 (times k_scale / v_scale), last dim contiguous
    req_to_token      [R, L] int32    (last dim contiguous)
    req_pool_indices  [B] int64, seq_lens [B] int32 (>= 1)
    out               [B, H, D]       model dtype
    mid_o             [B, H, num_kv_splits, D] fp32, mid_lse [B, H, num_kv_splits] fp32 (scratch)
    semaphore         [>= B * KVH] int32, all zero (left zero by every launch)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from radixfleet.kernels import dot_precision
from radixfleet.kernels.attention_tile import attend_tile
from radixfleet.kernels.pdl import pdl_start, use_pdl

_LOG2E = 1.4426950408889634
MAX_KV_SPLITS = 32
_NO_WINDOW = 1 << 30  # a window longer than any context


@triton.jit
def _decode_split_kernel(
    Q, K, V, REQ_TO_TOKEN, REQ_IDX, SEQ_LENS, MID_O, MID_LSE, OUT, SEMAPHORE,
    sm_scale_log2, v_scale, window, cap_log2,
    stride_qb, stride_qh,
    stride_kn, stride_kh,
    stride_vn, stride_vh,
    stride_rt,
    stride_mob, stride_moh, stride_mos,
    stride_mlb, stride_mlh,
    stride_ob, stride_oh,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SPLIT_STEP: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    pdl_start(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(SEQ_LENS + b)
    req = tl.load(REQ_IDX + b).to(tl.int64)
    lo = tl.maximum(seq_len - window, 0)  # the first slot in the sliding window
    # Chunk length: a multiple of BLOCK_N so that only the last tile of a chunk is ragged.
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.maximum(tl.minimum(start + chunk, seq_len), start)  # empty chunk: end == start

    offs_g = tl.arange(0, BLOCK_H)  # rows: the query heads of this kv head's group (padded)
    offs_h = kvh * GROUP + offs_g
    h_mask = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    row = REQ_TO_TOKEN + req * stride_rt
    # Whole tiles without masks (pipelined by the compiler), then the ragged last tile.
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    for n0 in range(start, full_end, BLOCK_N):
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, l_i, row, k_base, v_base, stride_kn, stride_vn,
                                    n0, end, offs_d, d_mask, sm_scale_log2, window, cap_log2,
                                    BLOCK_N, False, False, HEAD_DIM == BLOCK_D, PRECISION, False,
                                    SOFTCAP)
    if full_end < end:
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, l_i, row, k_base, v_base, stride_kn, stride_vn,
                                    full_end, end, offs_d, d_mask, sm_scale_log2, window, cap_log2,
                                    BLOCK_N, True, False, HEAD_DIM == BLOCK_D, PRECISION, False,
                                    SOFTCAP)

    # An empty chunk (start >= end) leaves l_i == 0: store o = 0 and lse = -inf so that
    # the merge gives it zero weight without producing NaN.
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None] * v_scale
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    mo = MID_O + b * stride_mob + offs_h[:, None] * stride_moh + offs_d[None, :]
    ml = MID_LSE + b * stride_mlb + offs_h * stride_mlh
    tl.store(mo + split * stride_mos, o, mask=h_mask[:, None] & d_mask[None, :])
    tl.store(ml + split, lse, mask=h_mask)

    # The last chunk of (request, kv head) to finish merges all of them: every thread's
    # stores are done (barrier) before one thread's release-increment of the counter, and
    # the program that sees NUM_SPLITS - 1 acquires before reading the others' partials
    # (through L2: .cg). It resets the counter for the next launch.
    tl.debug_barrier()
    sem = SEMAPHORE + b * NUM_KV_HEADS + kvh
    if tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
        # All chunks' partials in a few wide loads (not one dependent load per chunk): the
        # lse of every (head, chunk) first, then the outputs SPLIT_STEP chunks at a time.
        offs_m = tl.arange(0, BLOCK_G)
        m_mask = offs_m < GROUP
        offs_s = tl.arange(0, BLOCK_S)
        lse_g = MID_LSE + b * stride_mlb + (kvh * GROUP + offs_m) * stride_mlh
        part_lse = tl.load(lse_g[:, None] + offs_s[None, :],
                           mask=m_mask[:, None] & (offs_s < NUM_SPLITS)[None, :],
                           other=float("-inf"), cache_modifier=".cg")  # [BLOCK_G, BLOCK_S], log2 units
        # Chunk 0 is never empty (seq_len >= 1): top is finite on real heads.
        top = tl.where(m_mask, tl.max(part_lse, 1), 0.0)
        denom = tl.sum(tl.exp2(part_lse - top[:, None]), 1)
        merged = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        o_g = MID_O + b * stride_mob + (kvh * GROUP + offs_m) * stride_moh
        offs_c = tl.arange(0, SPLIT_STEP)
        for s0 in tl.static_range(0, BLOCK_S, SPLIT_STEP):
            c_mask = m_mask[:, None] & ((s0 + offs_c) < NUM_SPLITS)[None, :]
            weight = tl.exp2(tl.load(lse_g[:, None] + s0 + offs_c[None, :], mask=c_mask,
                                     other=float("-inf"), cache_modifier=".cg") - top[:, None])
            part_o = tl.load(o_g[:, None, None] + (s0 + offs_c)[None, :, None] * stride_mos
                             + offs_d[None, None, :],
                             mask=c_mask[:, :, None] & d_mask[None, None, :], other=0.0,
                             cache_modifier=".cg")  # [BLOCK_G, SPLIT_STEP, BLOCK_D]
            merged += tl.sum(part_o * weight[:, :, None], 1)
        merged = merged / denom[:, None]
        tl.store(OUT + b * stride_ob + (kvh * GROUP + offs_m)[:, None] * stride_oh + offs_d[None, :],
                 merged.to(OUT.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
        tl.store(sem, 0)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_kv_splits(batch_size: int, num_kv_heads: int, device: torch.device) -> int:
    """Enough (request, kv head, chunk) programs for about two waves over the SMs.

    Depends only on the batch size (not on sequence lengths), so a CUDA graph captured for a
    batch size stays valid as sequences grow.
    """
    if device.type != "cuda":
        return 4  # interpreter runs: exercise the split path
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(MAX_KV_SPLITS, triton.cdiv(target, batch_size * num_kv_heads)))


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_kv_splits: int | None = None,
    out: torch.Tensor | None = None,
    mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None,
    semaphore: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    window: int | None = None,
    logit_cap: float | None = None,
) -> torch.Tensor:
    """Attention of ``q`` [B, H, D] over each request's cached context → [B, H, D]
    (its last ``window`` tokens with a sliding window).

    An fp8 cache holds ``k / k_scale`` and ``v / v_scale`` (``kernels/kv_store.py``).

    ``mid_o``/``mid_lse``/``semaphore`` may be passed in (shapes in the module docstring) to
    reuse scratch across layers; ``num_kv_splits`` defaults to :func:`choose_num_kv_splits`; ``block_n``
    (keys per tile) defaults to 64, 32 for fp32 (shared memory).
    """
    B, H, D = q.shape
    KVH = k_buffer.shape[1]
    assert H % KVH == 0, f"num_heads {H} is not a multiple of num_kv_heads {KVH}"
    assert k_buffer.shape[2] == D and v_buffer.shape == k_buffer.shape, "k/v buffer shape mismatch"
    assert q.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1
    assert req_to_token.stride(1) == 1, "req_to_token rows must be contiguous"
    group = H // KVH
    splits = num_kv_splits or choose_num_kv_splits(B, KVH, q.device)
    if out is None:
        out = torch.empty_like(q)
    if mid_o is None:
        mid_o = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
    if mid_lse is None:
        mid_lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    if semaphore is None:
        semaphore = torch.zeros(B * KVH, dtype=torch.int32, device=q.device)
    assert mid_o.shape[:3] == (B, H, splits) and mid_lse.shape[:3] == (B, H, splits)
    assert semaphore.dtype == torch.int32 and semaphore.numel() >= B * KVH
    block_n = block_n or (32 if q.dtype == torch.float32 else 64)
    block_d = triton.next_power_of_2(D)
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot needs >= 16 rows
    block_s = triton.next_power_of_2(splits)

    _decode_split_kernel[(B, KVH, splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse, out,
        semaphore, scale * k_scale * _LOG2E, v_scale, window or _NO_WINDOW,
        (logit_cap or 0.0) * _LOG2E,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        NUM_KV_HEADS=KVH, GROUP=group, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_H=block_h,
        BLOCK_N=block_n, NUM_SPLITS=splits, BLOCK_G=triton.next_power_of_2(group),
        BLOCK_S=block_s, SPLIT_STEP=min(block_s, 8), PRECISION=dot_precision(q.dtype),
        USE_PDL=use_pdl(q), launch_pdl=use_pdl(q), num_warps=num_warps, num_stages=num_stages,
        SOFTCAP=logit_cap is not None,
    )
    return out
