"""Per-head RMSNorm of q and k (Qwen3's ``q_norm`` / ``k_norm``) in one launch.

``q`` [T, H, D] and ``k`` [T, KVH, D] are views of the qkv projection's output (rows of D
contiguous, heads D apart, tokens any stride apart); the result is new contiguous q and k,
every head normalised with its tensor's weight [D], rounded as ``kernels/rmsnorm.py`` rounds
(norm in fp32, rounded to the model dtype, times the weight, rounded again).
Grid: (T, H + KVH).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixfleet.kernels.pdl import pdl_start, use_pdl


@triton.jit
def _qk_norm_kernel(Q, K, WQ, WK, QO, KO, stride_qt, stride_kt, eps,
                    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    if h < H:
        x = tl.load(Q + t * stride_qt + h * D + offs, mask=mask, other=0.0)
        w = tl.load(WQ + offs, mask=mask, other=0.0)
    else:
        x = tl.load(K + t * stride_kt + (h - H) * D + offs, mask=mask, other=0.0)
        w = tl.load(WK + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / D + eps)
    y = ((xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)).to(x.dtype)
    if h < H:
        tl.store(QO + (t * H + h) * D + offs, y, mask=mask)
    else:
        tl.store(KO + (t * KVH + h - H) * D + offs, y, mask=mask)


def qk_rmsnorm(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm(q) * wq, rmsnorm(k) * wk)`` per head: ``q`` [T, H, D], ``k`` [T, KVH, D] with
    ``stride(2) == 1`` and ``stride(1) == D`` → contiguous tensors of the same shapes."""
    T, H, D = q.shape
    KVH = k.shape[1]
    assert k.shape == (T, KVH, D) and q.stride()[1:] == (D, 1) and k.stride()[1:] == (D, 1), \
        "q and k must be [T, heads, D] with heads of D contiguous"
    qo = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    ko = torch.empty(T, KVH, D, dtype=k.dtype, device=k.device)
    if T == 0:
        return qo, ko
    pdl = use_pdl(q)
    _qk_norm_kernel[(T, H + KVH)](q, k, wq, wk, qo, ko, q.stride(0), k.stride(0), eps, H=H, KVH=KVH, D=D,
                                  BLOCK_D=triton.next_power_of_2(D), USE_PDL=pdl, launch_pdl=pdl, num_warps=1)
    return qo, ko
