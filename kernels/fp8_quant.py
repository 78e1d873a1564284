"""Dynamic per-token FP8 quantization of activations, for the fp8 GEMM (``torch._scaled_mm``).

``x [M, K]`` (model dtype) → ``(xq float8_e4m3fn [M, K], scale fp32 [M, 1])`` with
``scale[m] = max(amax(|x[m]|), 1e-12) / 448`` and ``xq[m] = x[m] / scale[m]`` rounded to
nearest (saturating at ±448). One program per row: the row is read twice (amax, then the
scaled copy), from L2 the second time.
Grid: (M,).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0


@triton.jit
def _per_token_quant_kernel(X, XQ, SCALE, K, stride_x, stride_q, BLOCK: tl.constexpr,
                            FP8_MAX_: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(X + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0), 1e-12) / FP8_MAX_
    tl.store(SCALE + row, scale)
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(X + row * stride_x + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(x * inv, -FP8_MAX_, FP8_MAX_)
        tl.store(XQ + row * stride_q + k0 + offs, q.to(XQ.dtype.element_ty), mask=mask)


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (last dim contiguous) → ``(xq [M, K] fp8 e4m3, scale [M, 1] fp32)``."""
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [M, K] with contiguous rows"
    M, K = x.shape
    xq = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M == 0:
        return xq, scale
    block = min(2048, triton.next_power_of_2(K))
    _per_token_quant_kernel[(M,)](x, xq, scale, K, x.stride(0), xq.stride(0), BLOCK=block,
                                  FP8_MAX_=FP8_MAX, num_warps=4 if block <= 1024 else 8)
    return xq, scale
