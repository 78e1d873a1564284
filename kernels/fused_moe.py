"""Fused mixture-of-experts for CUDA: route, sort token/expert pairs by expert, then one
grouped-GEMM launch per projection.

``fused_moe(x, w13, w2, weights, ids)`` computes ``sum_j weights[t, j] * expert_{ids[t, j]}(x[t])``
with SwiGLU experts (``w13`` ``[E, 2I, H]`` gate rows then up rows, ``w2`` ``[E, H, I]``):

1. ``moe_align``: the ``T * k`` pairs (pair ``p`` is token ``p // k``'s ``p % k``-th choice)
   sorted by expert, each expert's run padded to a multiple of ``BLOCK_M`` with the sentinel
   ``T * k``; ``expert_ids[b]`` names the expert of block ``b``; ``num_post[0]`` the padded
   total. Up to ``ALIGN_MAX_PAIRS`` pairs (decode) this is one single-program kernel, which
   can also do the routing (softmax, top-k, renormalise) from the router logits
   (``route_and_align``); above, a few torch ops. Neither syncs with the host: the buffers are
   sized for the worst case (``T*k + min(T*k, E) * (BLOCK_M - 1)``), so a decode step is
   captured in a CUDA graph as is;
2. ``_moe_gemm_kernel`` on ``x`` and ``w13`` → ``[T*k, 2I]`` (rows in pair order);
3. ``_moe_gemm_kernel`` on SiLU-and-mul of that (applied as its tiles load) and ``w2``, each
   row scaled by its routing weight → ``[T*k, H]``;
4. the sum over each token's ``k`` rows → ``[T, H]``.

One token (batch-1 decode, ``fused_moe_one_token``) needs no sorting: its ``k`` experts are
distinct, so the GEMMs run one block per chosen expert (``DIRECT``), and the gate_up GEMM's
programs route the token themselves (``ROUTE``): three launches in all, with the sum.

The triton kernels launch with programmatic dependent launch where ``kernels/pdl.py`` allows.

Blocks past ``num_post`` exit at once; rows holding the sentinel are masked. Block sizes come
from ``moe_config`` (by token count; ``RADIXFLEET_MOE_CONFIGS`` overrides per shape, see
``benchmarks/moe_kernel.py --tune``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from radixfleet import env_vars
from radixfleet.kernels import dot_precision
from radixfleet.kernels.pdl import pdl_start, use_pdl

ALIGN_MAX_PAIRS = 4096  # T * k up to which the single-program align kernel runs
_CHUNK = 256  # pairs per step of the align kernel


@triton.jit
def _route_align_kernel(LOGITS, WEIGHTS, IDS, SORTED, EXPERT_IDS, NUM_POST, RUN,
                        T, stride_l, max_padded,
                        E: tl.constexpr, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                        NUM_BINS: tl.constexpr, ROUTE: tl.constexpr, RENORMALIZE: tl.constexpr,
                        K_POW2: tl.constexpr, TOKENS: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCKS: tl.constexpr, ALIGN: tl.constexpr, USE_PDL: tl.constexpr):
    """One program. ROUTE: first fill WEIGHTS/IDS [T, TOP_K] from LOGITS [T, E]. ALIGN: then
    group the T*TOP_K pairs of IDS by expert into SORTED, EXPERT_IDS per block, NUM_POST.
    RUN: int32 scratch of NUM_BINS (>= E + 1; bin E collects masked lanes)."""
    pdl_start(USE_PDL)
    n = T * TOP_K
    if ROUTE:
        cols = tl.arange(0, NUM_BINS)
        picks = tl.arange(0, K_POW2)
        for t0 in range(0, T, TOKENS):
            rows = t0 + tl.arange(0, TOKENS)
            ok = (rows[:, None] < T) & (cols[None, :] < E)
            logit = tl.load(LOGITS + rows[:, None] * stride_l + cols[None, :], mask=ok,
                            other=-float("inf")).to(tl.float32)
            p = tl.where(ok, tl.exp(logit - tl.max(logit, axis=1)[:, None]), 0.0)
            total = tl.sum(p, axis=1)
            w = tl.zeros([TOKENS, K_POW2], dtype=tl.float32)
            chosen = tl.zeros([TOKENS, K_POW2], dtype=tl.int32)
            for j in tl.static_range(TOP_K):
                best = tl.max(p, axis=1)
                # the lowest index among equal maxima
                idx = tl.min(tl.where(p == best[:, None], cols[None, :], NUM_BINS), axis=1)
                w = tl.where(picks[None, :] == j, best[:, None], w)
                chosen = tl.where(picks[None, :] == j, idx[:, None], chosen)
                p = tl.where(cols[None, :] == idx[:, None], -1.0, p)
            w = w / (tl.sum(w, axis=1)[:, None] if RENORMALIZE else total[:, None])
            out = (rows[:, None] < T) & (picks[None, :] < TOP_K)
            tl.store(IDS + rows[:, None] * TOP_K + picks[None, :], chosen, mask=out)
            tl.store(WEIGHTS + rows[:, None] * TOP_K + picks[None, :], w, mask=out)
        tl.debug_barrier()

    if ALIGN:
        bins = tl.arange(0, NUM_BINS)
        lanes = tl.arange(0, CHUNK)
        counts = tl.zeros([NUM_BINS], dtype=tl.int32)
        for s in range(0, n, CHUNK):
            e = tl.load(IDS + s + lanes, mask=s + lanes < n, other=E).to(tl.int32)
            counts += tl.histogram(e, NUM_BINS)
        counts = tl.where(bins < E, counts, 0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        end = tl.cumsum(padded, 0)
        tl.store(NUM_POST, tl.sum(padded, 0))
        tl.store(RUN + bins, end - padded)  # next free row of each expert
        # Block -> expert: the number of experts whose run ends at or before the block's start.
        for b0 in range(0, max_padded // BLOCK_M, BLOCKS):
            blocks = b0 + tl.arange(0, BLOCKS)
            before = (end[None, :] <= blocks[:, None] * BLOCK_M) & (bins[None, :] < E)
            expert = tl.minimum(tl.sum(before.to(tl.int32), axis=1), E - 1)
            tl.store(EXPERT_IDS + blocks, expert, mask=blocks < max_padded // BLOCK_M)
        for s in range(0, max_padded, CHUNK):
            tl.store(SORTED + s + lanes, n, mask=s + lanes < max_padded)
        tl.debug_barrier()  # RUN and the sentinel fill are visible before the scatter
        for s in range(0, n, CHUNK):
            ok = s + lanes < n
            e = tl.load(IDS + s + lanes, mask=ok, other=E).to(tl.int32)
            # A row of the expert's run for each pair (their order within a run is the
            # atomics' and does not matter: each pair's output row is its own).
            tl.store(SORTED + tl.atomic_add(RUN + e, 1, mask=ok), s + lanes, mask=ok)


@triton.jit
def route_one_token(LOGITS, choice, E: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                    NUM_BINS: tl.constexpr):
    """(expert, weight) of the ``choice``-th pick of a token's routing, from its logits [E]:
    the same arithmetic as ``_route_align_kernel``'s."""
    cols = tl.arange(0, NUM_BINS)
    logit = tl.load(LOGITS + cols, mask=cols < E, other=-float("inf")).to(tl.float32)
    p = tl.where(cols < E, tl.exp(logit - tl.max(logit, 0)), 0.0)
    total = tl.sum(p, 0)
    picked = total * 0.0
    expert = tl.min(cols, 0)  # 0, as an int32 tensor
    weight = total * 0.0
    for j in tl.static_range(TOP_K):
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, cols, NUM_BINS), 0)
        picked += best
        expert = tl.where(choice == j, idx, expert)
        weight = tl.where(choice == j, best, weight)
        p = tl.where(cols == idx, -1.0, p)
    return expert, weight / (picked if RENORMALIZE else total)


@triton.jit
def _moe_gemm_kernel(A, B, C, WEIGHTS, SORTED, EXPERT_IDS, NUM_POST, LOGITS,
                     N, K, num_pairs, max_padded,
                     stride_am, stride_be, stride_bn, stride_bk, stride_cm,
                     A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, SILU_MUL_A: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DIRECT: tl.constexpr,
                     ROUTE: tl.constexpr, E: tl.constexpr, TOP_K: tl.constexpr,
                     RENORMALIZE: tl.constexpr, NUM_BINS: tl.constexpr, USE_PDL: tl.constexpr):
    """C[p, :N] = A[p // A_ROW_DIV, :K] @ B[expert(p)].T (× WEIGHTS[p]) for the pairs p of
    each BLOCK_M-row block of SORTED. B: [E, N, K]. SILU_MUL_A: A holds [gate | up] of width
    2K and the operand is silu(gate) * up, rounded as ``kernels/activation.py`` rounds it.
    DIRECT (one token: its k experts are distinct): block p is pair p alone, EXPERT_IDS the
    routing's ids, no sorted layout. ROUTE (with DIRECT): each program routes the token from
    LOGITS itself, and the programs of column block 0 write EXPERT_IDS and WEIGHTS."""
    pdl_start(USE_PDL)
    pid = tl.program_id(0)
    num_m = tl.cdiv(max_padded, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks share their B tiles in L2.
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    if DIRECT:
        pairs = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs)
    else:
        if pid_m * BLOCK_M >= tl.load(NUM_POST):
            return
        pairs = tl.load(SORTED + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    if ROUTE:
        chosen, weight = route_one_token(LOGITS, pid_m, E, TOP_K, RENORMALIZE, NUM_BINS)
        if pid_n == 0:
            tl.store(EXPERT_IDS + pid_m, chosen)
            tl.store(WEIGHTS + pid_m, weight)
        expert = chosen.to(tl.int64)
    else:
        expert = tl.load(EXPERT_IDS + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + (pairs // A_ROW_DIV).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + expert * stride_be + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        if SILU_MUL_A:
            up = tl.load(a_ptrs + K, mask=valid[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            gate = a.to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(a.dtype).to(tl.float32)
            a = (act * up).to(a.dtype)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        acc = acc * tl.load(WEIGHTS + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = C + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def max_padded_rows(pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of the sorted layout in the worst case: every expert's run rounded up."""
    return pairs + min(pairs, num_experts) * (block_m - 1)


def route_align(ids: torch.Tensor, num_experts: int, block_m: int, logits: torch.Tensor | None = None,
                weights: torch.Tensor | None = None, renormalize: bool = False, align: bool = True):
    """One launch of ``_route_align_kernel``: with ``logits``, fill ``ids``/``weights`` [T, k]
    from them; with ``align``, return the sorted layout (else None)."""
    pairs, dev = ids.numel(), ids.device
    max_padded = triton.cdiv(max_padded_rows(pairs, num_experts, block_m), block_m) * block_m
    bins = triton.next_power_of_2(num_experts + 1)
    run = torch.empty(bins, dtype=torch.int32, device=dev)
    layout = (torch.empty(max_padded, dtype=torch.int32, device=dev),
              torch.empty(max_padded // block_m, dtype=torch.int32, device=dev),
              torch.empty(1, dtype=torch.int32, device=dev)) if align else (run, run, run)
    route = logits is not None
    pdl = use_pdl(ids)
    _route_align_kernel[(1,)](
        logits if route else ids, weights if route else run, ids, *layout, run,
        ids.shape[0], logits.stride(0) if route else 0, max_padded,
        E=num_experts, TOP_K=ids.shape[1], BLOCK_M=block_m, NUM_BINS=bins, ROUTE=route,
        RENORMALIZE=renormalize, K_POW2=triton.next_power_of_2(ids.shape[1]),
        TOKENS=max(1, min(32, 4096 // bins)), CHUNK=_CHUNK, BLOCKS=max(16, 4096 // bins),
        ALIGN=align, USE_PDL=pdl, launch_pdl=pdl, num_warps=4)
    return layout if align else None


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int):
    """``ids`` [T, k] → ``(sorted [max_padded] int32, expert_ids [max_padded / block_m] int32,
    num_post [1] int32)``: the single-program kernel up to ``ALIGN_MAX_PAIRS`` pairs, else
    torch ops (neither syncs with the host)."""
    pairs, dev = ids.numel(), ids.device
    if pairs <= ALIGN_MAX_PAIRS:
        return route_align(ids, num_experts, block_m)
    max_padded = triton.cdiv(max_padded_rows(pairs, num_experts, block_m), block_m) * block_m
    flat = ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    end = padded.cumsum(0)
    expert_of, order = flat.sort(stable=True)
    rank = torch.arange(pairs, device=dev) - (counts.cumsum(0) - counts)[expert_of]
    sorted_ids = torch.full((max_padded,), pairs, dtype=torch.int32, device=dev)
    sorted_ids[(end - padded)[expert_of] + rank] = order.to(torch.int32)
    starts = torch.arange(0, max_padded, block_m, device=dev)
    expert_ids = torch.searchsorted(end, starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, expert_ids, end[-1:].to(torch.int32)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) by the most tokens they serve.
_DEFAULT_CONFIGS = (
    (32, (16, 64, 128, 1, 4, 4)),
    (256, (32, 64, 128, 8, 4, 3)),
    (1024, (64, 64, 64, 8, 4, 3)),
    (1 << 62, (64, 128, 64, 8, 8, 3)),
)


@functools.cache
def _tuned() -> dict:
    return env_vars.MOE_CONFIGS.get()


def moe_config(tokens: int, num_experts: int, n: int, k: int) -> tuple[int, ...]:
    """Block sizes for a GEMM of ``tokens`` tokens against ``num_experts`` [n, k] experts:
    ``RADIXFLEET_MOE_CONFIGS`` (``{"E,N,K": [[max_tokens, [BM, BN, BK, GM, warps, stages]],
    ...]}``) where it has the shape, else the defaults above."""
    table = _tuned().get(f"{num_experts},{n},{k}") or _DEFAULT_CONFIGS
    for max_tokens, config in table:
        if tokens <= max_tokens:
            return tuple(config)
    return tuple(table[-1][1])


def moe_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, sorted_ids, expert_ids, num_post,
             a_row_div: int, config: tuple[int, ...], weights: torch.Tensor | None = None,
             silu_mul_a: bool = False, route: tuple | None = None) -> torch.Tensor:
    """``out[p] = a[p // a_row_div] @ b[expert(p)].T`` (× ``weights[p]``) for every pair;
    with ``silu_mul_a``, ``a`` is ``[gate | up]`` and ``silu(gate) * up`` is multiplied.
    ``sorted_ids`` None: direct mode, ``expert_ids`` holds each pair's expert. ``route``
    ``(logits [E], top_k, renormalize, weights_out)`` (direct mode): the kernel routes and
    writes ``expert_ids`` and ``weights_out``."""
    bm, bn, bk, gm, warps, stages = config
    n, k = b.shape[1], b.shape[2]
    pdl = use_pdl(a)
    direct = sorted_ids is None
    max_padded = out.shape[0] * bm if direct else sorted_ids.numel()
    grid = (triton.cdiv(max_padded, bm) * triton.cdiv(n, bn),)
    logits, top_k, renormalize, weights_out = route or (expert_ids, 1, False, None)
    assert route is None or direct, "routing in the GEMM is for one token (direct mode)"
    _moe_gemm_kernel[grid](
        a, b, out, weights_out if route else weights if weights is not None else a,
        expert_ids if direct else sorted_ids, expert_ids, expert_ids if direct else num_post, logits,
        n, k, out.shape[0], max_padded, a.stride(0), b.stride(0), b.stride(1), b.stride(2), out.stride(0),
        A_ROW_DIV=a_row_div, MUL_WEIGHT=weights is not None, SILU_MUL_A=silu_mul_a,
        PRECISION=dot_precision(a.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1 if direct else gm,
        DIRECT=direct, ROUTE=route is not None, E=logits.numel() if route else 1, TOP_K=top_k,
        RENORMALIZE=renormalize, NUM_BINS=triton.next_power_of_2(logits.numel()) if route else 1,
        USE_PDL=pdl, launch_pdl=pdl, num_warps=warps, num_stages=stages)
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, config: tuple[int, ...] | None = None,
              aligned: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """``x`` [T, H]; ``w13`` [E, 2I, H]; ``w2`` [E, H, I]; ``weights`` [T, k] fp32; ``ids``
    [T, k] → [T, H] in ``x``'s dtype. ``aligned``: ``moe_align``'s output when the caller
    routed already (``route_and_align``)."""
    T, k = ids.shape
    E, two_i, H = w13.shape
    assert x.stride(-1) == 1 and w13.stride(-1) == 1 and w2.stride(-1) == 1, "rows must be contiguous"
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    config = config or moe_config(T, E, two_i, H)
    if T == 1:  # batch-1 decode: one block per chosen expert, no sorting
        sorted_ids, expert_ids, num_post = None, ids.reshape(-1), None
    else:
        sorted_ids, expert_ids, num_post = aligned or moe_align(ids, E, config[0])
    gate_up = torch.empty(T * k, two_i, dtype=x.dtype, device=x.device)
    moe_gemm(x, w13, gate_up, sorted_ids, expert_ids, num_post, k, config)
    down = torch.empty(T * k, H, dtype=x.dtype, device=x.device)
    moe_gemm(gate_up, w2, down, sorted_ids, expert_ids, num_post, 1, config,
             weights=weights.reshape(-1).float().contiguous(), silu_mul_a=True)
    return torch.sum(down.view(T, k, H), dim=1, out=out)


def fused_moe_one_token(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, logits: torch.Tensor,
                        top_k: int, renormalize: bool, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """Batch-1 decode in three launches: the gate_up GEMM routes the token itself (each of its
    programs from the ``logits`` [1, E]) and records the choice for the down GEMM, then the
    sum over the ``k`` experts. → [1, H] in ``x``'s dtype."""
    E, two_i, H = w13.shape
    assert x.shape[0] == 1 and logits.shape == (1, E) and logits.is_contiguous()
    config = config or moe_config(1, E, two_i, H)
    ids = torch.empty(top_k, dtype=torch.int32, device=x.device)
    weights = torch.empty(top_k, dtype=torch.float32, device=x.device)
    gate_up = torch.empty(top_k, two_i, dtype=x.dtype, device=x.device)
    moe_gemm(x, w13, gate_up, None, ids, None, top_k, config, route=(logits, top_k, renormalize, weights))
    down = torch.empty(top_k, H, dtype=x.dtype, device=x.device)
    moe_gemm(gate_up, w2, down, None, ids, None, 1, config, weights=weights, silu_mul_a=True)
    return down.sum(0, keepdim=True)


def route_and_align(logits: torch.Tensor, top_k: int, renormalize: bool, two_i: int, hidden: int):
    """Decode-sized routing (softmax, top-k, renormalise) in the align kernel, one launch:
    ``logits`` [T, E] → ``(weights [T, k] fp32, ids [T, k] int32, config, aligned)`` for
    ``fused_moe`` (``aligned`` None for one token, which needs no layout), or None when
    ``T * k`` exceeds ``ALIGN_MAX_PAIRS`` (route with torch and call ``fused_moe``)."""
    T, E = logits.shape
    if T * top_k > ALIGN_MAX_PAIRS:
        return None
    config = moe_config(T, E, two_i, hidden)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    aligned = route_align(ids, E, config[0], logits, weights, renormalize, align=T > 1)
    return weights, ids, config, aligned
