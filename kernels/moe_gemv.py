"""Batch-1 decode of a mixture-of-experts layer as two GEMVs, in the style of
``kernels/gemv.py``: one token reads only its ``k`` chosen experts, so the layer's time is
those experts' bytes over the bandwidth, and a GEMM tile padded to 16 rows for one token
(``fused_moe_one_token``) spends its loads through shared memory for nothing.

1. ``_gate_up_kernel``: program ``(j, row block)`` routes the token from the router logits
   (the ``j``-th choice, ``fused_moe.route_one_token``), reads the block's gate rows and the
   matching up rows of that expert against ``x`` held whole in registers, and writes
   ``silu(gate) * up`` for those rows (rounded as the GEMM path rounds: gate and up to the
   model dtype, SiLU to the model dtype, the product to the model dtype). The programs of
   row block 0 record the choice and its routing weight.
2. ``_down_kernel``: program ``row block`` reads those rows of each chosen expert's down
   projection against that expert's activation row and sums them weighted, in fp32: the
   layer's output, with no separate sum over the experts.

Both launch with programmatic dependent launch where ``kernels/pdl.py`` allows. The expert a
program reads depends on the routing, so neither may load weights before its wait.
Experts up to ``MAX_WIDTH`` wide on both sides run here (Qwen3-30B-A3B, Qwen2-MoE, Mixtral);
``fused_moe_one_token`` takes wider ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixfleet.kernels.fused_moe import route_align, route_one_token
from radixfleet.kernels.pdl import pdl_start, use_pdl

MAX_WIDTH = 16384  # widest hidden or intermediate size held as one row in registers
# (rows per program, warps) per kernel, and whether to route first, in fused_moe's
# one-program routing kernel (the gate_up programs then load their expert id instead of each
# routing for itself): the best of ``benchmarks/moe_kernel.py --one-token-graph`` on an H100
# at Qwen3-30B-A3B's experts (31.6 us per layer, 2.39 TB/s on the 8 experts' 75.5 MB; routing
# inside the programs 32.2 us; the earlier (2, 4) / (4, 4) blocks 46 us: four down rows
# per program leave too few programs to keep the loads in flight).
GATE_UP_CONFIG = (1, 4)
DOWN_CONFIG = (1, 4)
ROUTE_SEPARATELY = True


@triton.jit
def _gate_up_kernel(X, W13, LOGITS, ACT, IDS, WEIGHTS, INTER, H, stride_we, stride_wn,
                    E: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                    NUM_BINS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                    ROUTED: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    pid = tl.program_id(0)
    blocks = tl.cdiv(INTER, BLOCK_N)
    choice, block = pid // blocks, pid % blocks
    if ROUTED:  # fused_moe.route_align ran first
        expert = tl.load(IDS + choice)
    else:
        expert, weight = route_one_token(LOGITS, choice, E, TOP_K, RENORMALIZE, NUM_BINS)
        if block == 0:
            tl.store(IDS + choice, expert)
            tl.store(WEIGHTS + choice, weight)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < INTER)[:, None] & col_ok[None, :]
    base = W13 + expert.to(tl.int64) * stride_we + cols[None, :]
    gate_w = tl.load(base + rows.to(tl.int64)[:, None] * stride_wn, mask=ok, other=0.0,
                     eviction_policy="evict_first")
    up_w = tl.load(base + (rows + INTER).to(tl.int64)[:, None] * stride_wn, mask=ok, other=0.0,
                   eviction_policy="evict_first")
    x = tl.load(X + cols, mask=col_ok, other=0.0).to(tl.float32)
    dtype = X.dtype.element_ty
    gate = tl.sum(gate_w.to(tl.float32) * x[None, :], axis=1).to(dtype).to(tl.float32)
    up = tl.sum(up_w.to(tl.float32) * x[None, :], axis=1).to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(ACT + choice * INTER + rows, (act * up).to(dtype), mask=rows < INTER)


@triton.jit
def _down_kernel(ACT, W2, IDS, WEIGHTS, OUT, H, INTER, stride_we, stride_wn,
                 TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_I)
    col_ok = cols < INTER
    ok = (rows < H)[:, None] & col_ok[None, :]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        expert = tl.load(IDS + j).to(tl.int64)
        w = tl.load(W2 + expert * stride_we + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :],
                    mask=ok, other=0.0, eviction_policy="evict_first")
        a = tl.load(ACT + j * INTER + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.load(WEIGHTS + j) * tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    tl.store(OUT + rows, acc.to(OUT.dtype.element_ty), mask=rows < H)


def fits(hidden: int, intermediate: int) -> bool:
    """Whether experts of this shape run here (each side's row fits in registers)."""
    return max(triton.next_power_of_2(hidden), triton.next_power_of_2(intermediate)) <= MAX_WIDTH


def moe_one_token(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, logits: torch.Tensor,
                  top_k: int, renormalize: bool) -> torch.Tensor:
    """``x`` [1, H]; ``w13`` [E, 2I, H] (gate rows, then up rows); ``w2`` [E, H, I]; ``logits``
    [1, E] → [1, H] in x's dtype: ``sum_j weight_j * expert_j(x)`` over the top ``top_k``
    experts of ``softmax(logits)`` (renormalised over the chosen ones with ``renormalize``)."""
    E, two_i, H = w13.shape
    inter = two_i // 2
    assert x.shape == (1, H) and x.is_contiguous() and logits.shape == (1, E) and logits.is_contiguous()
    assert w13.stride(-1) == 1 and w2.stride(-1) == 1 and w2.shape == (E, H, inter)
    assert fits(H, inter), f"experts of hidden {H} / intermediate {inter} are too wide for the GEMV path"
    dev = x.device
    ids = torch.empty(top_k, dtype=torch.int32, device=dev)
    weights = torch.empty(top_k, dtype=torch.float32, device=dev)
    act = torch.empty(top_k, inter, dtype=x.dtype, device=dev)
    out = torch.empty(1, H, dtype=x.dtype, device=dev)
    pdl = use_pdl(x)
    bins = triton.next_power_of_2(E)
    routed = ROUTE_SEPARATELY
    if routed:
        route_align(ids.view(1, top_k), E, 1, logits, weights.view(1, top_k), renormalize, align=False)
    block_n, warps = GATE_UP_CONFIG
    _gate_up_kernel[(top_k * triton.cdiv(inter, block_n),)](
        x, w13, logits, act, ids, weights, inter, H, w13.stride(0), w13.stride(1),
        E=E, TOP_K=top_k, RENORMALIZE=renormalize, NUM_BINS=bins, BLOCK_N=block_n,
        BLOCK_H=triton.next_power_of_2(H), ROUTED=routed, USE_PDL=pdl, launch_pdl=pdl, num_warps=warps)
    block_n, warps = DOWN_CONFIG
    _down_kernel[(triton.cdiv(H, block_n),)](
        act, w2, ids, weights, out, H, inter, w2.stride(0), w2.stride(1),
        TOP_K=top_k, BLOCK_N=block_n, BLOCK_I=triton.next_power_of_2(inter), USE_PDL=pdl,
        launch_pdl=pdl, num_warps=warps)
    return out
