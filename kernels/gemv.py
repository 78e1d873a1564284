"""Batch-1 GEMV for decode: ``x [1, K] @ W[N, K].T (+ bias) → [1, N]``, bf16/fp16, fp32 accumulate.

At batch 1 a linear layer only streams its weight, so its time is bytes / bandwidth. cuBLAS's
heuristics pick split-K tiles for the narrower Llama-3.1-8B projections (qkv 6144×4096,
o_proj 4096×4096) that reach ~72% of HBM bandwidth on an H200 plus a separate split-K
reduce launch (``benchmarks/one_batch.py --profile``). Here each program owns ``BLOCK_N``
output rows and walks K in ``BLOCK_K`` steps, keeping a ``[BLOCK_N, BLOCK_K]`` fp32
partial-product tile in registers and reducing it once at the end: no split-K, one launch.
Configurations are autotuned per (N, K) on first use (outside CUDA-graph capture: the graph
runner warms every batch size up first).

Grid: (cdiv(N, BLOCK_N),).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (8, 512, 8, 3), (16, 256, 4, 3),
        (16, 256, 8, 4), (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 8, 3), (8, 1024, 8, 2),
        (4, 1024, 4, 2), (16, 128, 4, 6),
    ]
]


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _gemv_kernel(X, W, B, OUT, N, K, stride_w, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    w_ptrs = W + rows.to(tl.int64)[:, None] * stride_w + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        col_ok = (k + cols) < K
        x = tl.load(X + k + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs + k, mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(OUT + rows, y.to(OUT.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [1, K] contiguous, ``weight`` [N, K] with contiguous rows → [1, N] in x's dtype."""
    assert x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous(), "x must be one contiguous row"
    n, k = weight.shape
    assert weight.stride(1) == 1 and x.shape[1] == k
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x, weight, bias if bias is not None else x, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None)
    return out
