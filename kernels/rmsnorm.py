"""RMSNorm and fused residual-add + RMSNorm, one row per program.

Matches transformers' Llama RMSNorm rounding: the sum ``x + residual`` is rounded to the
model dtype (it is the new residual), the norm is computed in fp32, rounded to the model
dtype, then multiplied by the weight and rounded again.

Shapes (T rows, N hidden):
    x, residual [T, N]  model dtype, last dim contiguous
    weight      [N]
    returns     [T, N]  (and the new residual [T, N] for the fused form)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixfleet.kernels.pdl import pdl_start, use_pdl


@triton.jit
def _rmsnorm_kernel(
    X, R, W, OUT, NEW_R,
    stride_x, stride_r, stride_o, stride_nr,
    eps,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(NEW_R + row * stride_nr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    normed = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + offs, (normed * w).to(OUT.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [T, N] with a contiguous last dim"
    T, N = x.shape
    assert weight.shape == (N,), f"weight shape {tuple(weight.shape)} != ({N},)"
    out = torch.empty_like(x)
    new_r = torch.empty_like(x) if residual is not None else out
    if T == 0:
        return out, new_r
    block_n = triton.next_power_of_2(N)
    r = residual if residual is not None else x
    assert r.shape == x.shape and r.stride(1) == 1
    _rmsnorm_kernel[(T,)](
        x, r, weight, out, new_r,
        x.stride(0), r.stride(0), out.stride(0), new_r.stride(0),
        eps,
        N=N, BLOCK_N=block_n, HAS_RESIDUAL=residual is not None,
        USE_PDL=use_pdl(x), launch_pdl=use_pdl(x),
        num_warps=min(16, max(1, block_n // 512)),
    )
    return out, new_r


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * (x / rms(x))`` over the last dim of ``x`` [T, N]."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` → ``(rmsnorm(s), s)``, both [T, N]."""
    return _launch(x, residual, weight, eps)
