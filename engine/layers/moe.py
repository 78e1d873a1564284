"""Mixture-of-experts MLP: a router picks ``top_k`` of ``E`` SwiGLU experts per token.

Weights of all experts live in two stacked tensors, this rank's slice of the intermediate
dimension ``I`` (tensor parallelism splits every expert's ``I``; each rank returns a
partial sum that the caller all-reduces once):

- ``w13`` ``[E, 2 * I/tp, H]``: gate rows, then up rows;
- ``w2`` ``[E, H, I/tp]``.

Two implementations of ``experts(x, weights, ids)``:

- CUDA: ``kernels/fused_moe.py`` (token/expert pairs sorted by expert, one grouped GEMM
  launch per projection; no host sync, so decode steps are captured in CUDA graphs);
- elsewhere, or with ``RADIXFLEET_MOE_TORCH=1``: a loop over the experts that received
  tokens (``moe_torch``), which is also the reference the kernel is tested against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from radixfleet import env_vars
from radixfleet.engine.layers import distributed as dist


def select_experts(router_logits: torch.Tensor, top_k: int,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, the ``top_k`` largest, optionally renormalised to sum
    to 1 (Mixtral always: that is a softmax over the top-k logits; Qwen-MoE when
    ``norm_topk_prob``). ``router_logits`` [T, E] → (weights [T, k] fp32, ids [T, k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def moe_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """Reference experts: ``x`` [T, H], ``weights``/``ids`` [T, k] → ``sum_k w * expert(x)``
    [T, H] in ``x``'s dtype. Loops over the experts that received tokens, in expert order
    (as transformers does); this needs the per-expert counts on the host."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return _moe_torch_dense(x, w13, w2, weights, ids)
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)  # [T*k] token/expert pairs grouped by expert
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    scale = weights.reshape(-1).to(x.dtype)
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tokens = pairs // k
        y = _expert_mlp(x[tokens], w13[e], w2[e]) * scale[pairs, None]
        out.index_add_(0, tokens, y)
    return out


def _moe_torch_dense(x, w13, w2, weights, ids):
    """Every expert over every token, weighted by a dense [T, E] matrix (zeros off the top-k):
    no host sync, so it can be captured in a CUDA graph. Slow; only for the torch reference
    under capture."""
    dense = torch.zeros(x.shape[0], w13.shape[0], dtype=x.dtype, device=x.device)
    dense.scatter_(1, ids, weights.to(x.dtype))
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        out += _expert_mlp(x, w13[e], w2[e]) * dense[:, e:e + 1]
    return out


@functools.cache
def _fused_moe():
    """``kernels/fused_moe``, or None where triton is missing or it is switched off."""
    if env_vars.MOE_TORCH.get() or env_vars.DISABLE_FUSED_KERNELS.get():
        return None
    try:
        from radixfleet.kernels import fused_moe
    except ImportError:
        return None
    return fused_moe


@functools.cache
def _moe_gemv():
    """``kernels/moe_gemv`` for one token (batch-1 decode), or None where it is switched off."""
    if not env_vars.MOE_ONE_TOKEN_GEMV.get():
        return None
    from radixfleet.kernels import moe_gemv

    return moe_gemv


class FusedMoE(nn.Module):
    """The experts of one layer and their routing. ``forward`` returns this rank's partial
    sum (not reduced)."""

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, renormalize: bool):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        tp = dist.tp_size()
        if intermediate % tp:
            raise ValueError(f"the experts' intermediate size {intermediate} does not split over tp={tp}")
        self.num_experts, self.inter = num_experts, intermediate // tp
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, self.inter), requires_grad=False)
        self.w13.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.w2.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """``shard_id``: ``(expert, "gate" | "up" | "down")`` for one expert's matrix
        (``[I, H]`` or ``[H, I]``), or ``(None, "gate_up" | "down")`` for all experts stacked
        (transformers 5's in-memory layout: ``[E, 2I, H]`` / ``[E, H, I]``)."""
        expert, part = shard_id
        r, n = dist.tp_rank(), self.inter
        dst = param.data if expert is None else param.data[expert]
        if part == "down":  # split the input (last) dimension
            dst.copy_(loaded.narrow(-1, r * n, n))
        elif part == "gate_up":  # both halves of the stacked tensor
            full = loaded.shape[-2] // 2
            dst[..., :n, :].copy_(loaded.narrow(-2, r * n, n))
            dst[..., n:, :].copy_(loaded.narrow(-2, full + r * n, n))
        else:
            offset = 0 if part == "gate" else n
            dst[offset:offset + n].copy_(loaded.narrow(0, r * n, n))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """``x`` [T, H], ``router_logits`` [T, E] → [T, H] (this rank's part)."""
        kernels = _fused_moe() if x.is_cuda else None
        if kernels is None:
            weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
            return moe_torch(x, self.w13, self.w2, weights, ids)
        if x.shape[0] == 1:  # batch-1 decode: two GEMVs, or the GEMM that routes inside
            gemv = _moe_gemv()
            one_token = kernels.fused_moe_one_token
            if gemv is not None and gemv.fits(self.w13.shape[2], self.inter):
                one_token = gemv.moe_one_token
            return one_token(x, self.w13, self.w2, router_logits, self.top_k, self.renormalize)
        # Decode-sized batches route inside the align kernel (one launch, no host sync).
        routed = kernels.route_and_align(router_logits, self.top_k, self.renormalize, *self.w13.shape[1:])
        if routed is None:
            weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
            return kernels.fused_moe(x, self.w13, self.w2, weights, ids)
        weights, ids, config, aligned = routed
        return kernels.fused_moe(x, self.w13, self.w2, weights, ids, config, aligned)
