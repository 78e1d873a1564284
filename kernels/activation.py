"""SiLU-and-mul (the gated MLP activation): ``x [T, 2I] → silu(x[:, :I]) * x[:, I:]  [T, I]``.

Rounding matches ``F.silu(gate) * up`` in the model dtype: silu in fp32 rounded to the
model dtype, then the product in fp32 rounded again.
Grid: (T, cdiv(I, BLOCK)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixfleet.kernels.pdl import pdl_start, use_pdl


@triton.jit
def _silu_and_mul_kernel(X, OUT, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * stride_o + offs, (act * up).to(OUT.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x`` [T, 2I] (last dim contiguous) → [T, I]."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1, "x must be [T, 2I]"
    T, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(T, inter, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), INTER=inter, BLOCK=block, num_warps=4,
        USE_PDL=use_pdl(x), launch_pdl=use_pdl(x),
    )
    return out
