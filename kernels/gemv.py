"""Batch-1 GEMV for decode: ``x [1, K] @ W[N, K].T (+ bias) → [1, N]``, bf16/fp16, fp32 accumulate,
optionally with the elementwise op that produces ``x`` folded into it.

At batch 1 a linear layer only streams its weight, so its time is bytes / bandwidth, and each
separate elementwise kernel before it costs a launch and a gap in the CUDA graph that are
about as long as the kernel. Each program owns ``BLOCK_N`` output rows and walks K in
``BLOCK_K`` steps, keeping a ``[BLOCK_N, BLOCK_K]`` fp32 partial-product tile in registers and
reducing it once at the end: no split-K, one launch. Every program reads all of ``x`` (from
L2), so the op that makes ``x`` can run in the loop:

- ``gemv``: plain ``x``.
- ``gemv_rmsnorm``: ``x = rmsnorm(h + residual) * norm_weight`` (the decoder layer's input and
  post-attention norms). The sum of squares is accumulated in the same loop and ``1/rms``
  scales each output at the end, so ``x`` is never materialised; the first program writes
  the new residual ``h + residual``. Differs from the separate kernels only in rounding:
  the normalised row is not rounded to the model dtype before the weight multiply.
- ``gemv_silu_mul``: ``x = silu(gate) * up`` from the ``[1, 2K]`` gate_up output (the MLP's
  down projection), rounded as ``kernels/activation.py`` rounds it.

Configurations are autotuned per (N, K, prologue) on first use (outside CUDA-graph capture:
the graph runner warms every batch size up first).

Grid: (cdiv(N, BLOCK_N),).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from radixfleet.kernels.pdl import gdc_launch_dependents, gdc_wait, prefetch_l2, use_pdl

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (8, 512, 8, 3), (16, 256, 4, 3),
        (16, 256, 8, 4), (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 8, 3), (8, 1024, 8, 2),
        (4, 1024, 4, 2), (16, 128, 4, 6), (8, 512, 4, 4), (16, 512, 4, 4), (32, 512, 8, 2),
    ]
]

PLAIN, RMSNORM, SILU_MUL = 0, 1, 2
_PREFETCH_MAX_BYTES = int(os.environ.get("RADIXFLEET_GEMV_PREFETCH_MAX_BYTES", 40 << 20))


@triton.autotune(configs=_CONFIGS, key=["N", "K", "PROLOGUE"])
@triton.jit
def _gemv_kernel(X, RES, NORM_W, W, B, OUT, NEW_RES, N, K, stride_w, eps,
                 PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 USE_PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr, LINE_ELEMS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_PDL:  # see kernels/pdl.py
        gdc_launch_dependents()
        if PREFETCH_LINES > 0:
            # The weight does not depend on the previous kernel: start pulling this program's
            # rows into L2 while that kernel still runs, then wait for it.
            offs = tl.arange(0, PREFETCH_LINES) * LINE_ELEMS
            offs = tl.where(offs < K, offs, 0)
            first = tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_w
            prefetch_l2(W + first + offs[None, :])
        gdc_wait()
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    w_ptrs = W + rows.to(tl.int64)[:, None] * stride_w + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        col_ok = (k + cols) < K
        if PROLOGUE == 1:  # x = (h + residual) * norm_weight; 1/rms applied at the end
            s = tl.load(X + k + cols, mask=col_ok, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(RES + k + cols, mask=col_ok, other=0.0)
                s = (s.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
                if pid == 0:
                    tl.store(NEW_RES + k + cols, s, mask=col_ok)
            sf = s.to(tl.float32)
            sum_sq += sf * sf
            x = sf * tl.load(NORM_W + k + cols, mask=col_ok, other=0.0).to(tl.float32)
        elif PROLOGUE == 2:  # x = silu(gate) * up, gate_up = [gate | up] of width 2K
            gate = tl.load(X + k + cols, mask=col_ok, other=0.0).to(tl.float32)
            up = tl.load(X + K + k + cols, mask=col_ok, other=0.0).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty).to(tl.float32)
            x = (act * up).to(X.dtype.element_ty).to(tl.float32)
        else:
            x = tl.load(X + k + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs + k, mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if PROLOGUE == 1:
        y = y / tl.sqrt(tl.sum(sum_sq, 0) / K + eps)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(OUT + rows, y.to(OUT.dtype.element_ty), mask=row_ok)


def _launch(x, weight, bias, prologue, k, residual=None, norm_weight=None, new_residual=None,
            eps=0.0) -> torch.Tensor:
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1, "weight must be [N, K] with contiguous rows"
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    pdl = use_pdl(x)
    line_elems = 128 // weight.element_size()
    # Prefetch only weights that fit in L2 beside everything else (H100/H200: 50 MB).
    prefetch = pdl and weight.numel() * weight.element_size() <= _PREFETCH_MAX_BYTES
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else x,
        weight, bias if bias is not None else x, out,
        new_residual if new_residual is not None else x, n, k, weight.stride(0), eps,
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        USE_PDL=pdl, PREFETCH_LINES=triton.next_power_of_2(triton.cdiv(k, line_elems)) if prefetch else 0,
        LINE_ELEMS=line_elems, launch_pdl=pdl)
    return out


def _check_row(x: torch.Tensor, name: str = "x") -> None:
    assert x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous(), f"{name} must be one contiguous row"


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [1, K] contiguous, ``weight`` [N, K] with contiguous rows → [1, N] in x's dtype."""
    _check_row(x)
    return _launch(x, weight, bias, PLAIN, x.shape[1])


def gemv_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                 eps: float, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (or ``x``) → ``(rmsnorm(s) * norm_weight @ weight.T + bias, s)``."""
    _check_row(x)
    if residual is not None:
        _check_row(residual, "residual")
        assert residual.shape == x.shape
    assert norm_weight.shape == (x.shape[1],) and norm_weight.is_contiguous()
    new_residual = torch.empty_like(x) if residual is not None else x
    out = _launch(x, weight, bias, RMSNORM, x.shape[1], residual, norm_weight,
                  new_residual if residual is not None else None, eps)
    return out, new_residual


def gemv_silu_mul(gate_up: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``gate_up`` [1, 2K] → ``(silu(gate) * up) @ weight.T + bias`` [1, N]."""
    _check_row(gate_up, "gate_up")
    assert gate_up.shape[1] % 2 == 0
    return _launch(gate_up, weight, bias, SILU_MUL, gate_up.shape[1] // 2)
