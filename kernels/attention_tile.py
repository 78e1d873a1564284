"""The inner step shared by the decode and extend attention kernels: one tile of keys.

``attend_tile`` loads BLOCK_N keys/values of one request through its req→token row
(token-slot layout: ``k_base + slot * stride_kn + d``), and folds them into an online
softmax held as (acc ``[M, D]``, l_i ``[M]``, m_i ``[M]``, in log2 units) for M query rows q
``[M, D]``. Triton inlines it, so the callers' compiled code is as if written in place.

MASKED=False: every key of the tile lies before ``kv_end`` (no masks at all).
CAUSAL: query row i sees keys ``<= q_pos[i]`` (extend); requires MASKED.
WINDOWED: query row i sees only keys ``> q_pos[i] - window`` (sliding window); requires
CAUSAL. A row may then see no key of a tile, so the online softmax guards ``m = -inf``.
SOFTCAP: the logits become ``cap * tanh(logit / cap)`` (``cap_log2``: the cap in log2 units).

An fp8 cache's keys and values are converted to q's dtype as they are loaded; the caller
folds the k scale into ``sm_scale_log2`` and multiplies its output by the v scale.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_tile(acc, l_i, m_i, q, q_pos, row, k_base, v_base, stride_kn, stride_vn, n0, kv_end,
                offs_d, d_mask, sm_scale_log2, window, cap_log2,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                EVEN_D: tl.constexpr, PRECISION: tl.constexpr, WINDOWED: tl.constexpr,
                SOFTCAP: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        n_mask = offs_n < kv_end
        slots = tl.load(row + offs_n, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
    else:
        slots = tl.load(row + offs_n).to(tl.int64)
        kv_mask = d_mask[None, :]
    k_ptrs = k_base + slots[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_base + slots[:, None] * stride_vn + offs_d[None, :]
    # v is loaded with k, before it is needed, so both gathers are in flight together.
    if MASKED or not EVEN_D:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    k = k.to(q.dtype)  # no-op unless the cache is fp8
    v = v.to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2  # [M, BLOCK_N], log2 units
    if SOFTCAP:  # tanh(x) = 2 sigmoid(2x) - 1
        qk = cap_log2 * (2.0 * tl.sigmoid(2.0 * qk / cap_log2) - 1.0)
    if WINDOWED:
        visible = (q_pos[:, None] >= offs_n[None, :]) & (offs_n[None, :] > q_pos[:, None] - window)
        qk = tl.where(visible & n_mask[None, :], qk, float("-inf"))
    elif CAUSAL:
        # Every row keeps key 0 (in the first tile), so m_i is finite after it.
        qk = tl.where((q_pos[:, None] >= offs_n[None, :]) & n_mask[None, :], qk, float("-inf"))
    elif MASKED:
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if WINDOWED:  # a row with no visible key yet: subtract 0, not -inf (no NaN)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(qk - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new
