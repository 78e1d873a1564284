"""Plain-torch reference and random inputs for the fused MoE kernel tests (GPU and the CPU
interpreter): every (token, choice) pair computed on its own in fp32, no kernel code."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (tokens, experts, top_k, hidden, intermediate): decode and prefill sizes, k = 1 .. 8, and
# shapes that are not multiples of the block sizes.
SHAPES = [(1, 8, 2, 64, 32), (1, 64, 8, 48, 40), (3, 4, 1, 48, 40), (7, 16, 4, 64, 48), (33, 8, 2, 96, 64),
          (64, 32, 8, 64, 32), (200, 6, 3, 80, 72)]


def moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
            ids: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[t, j] * down(silu(gate) * up)`` per token, in fp32 → [T, H] fp32."""
    x, w13, w2 = x.float(), w13.float(), w2.float()
    inter = w2.shape[2]
    out = torch.zeros(x.shape[0], w2.shape[1], device=x.device)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e] @ x[t]
            out[t] += weights[t, j].float() * (w2[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out


def routing_ref(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 softmax, top-k, optional renormalisation → (weights fp32, ids int64)."""
    probs = torch.softmax(logits.float(), -1)
    weights, ids = probs.topk(top_k, -1)
    return (weights / weights.sum(-1, keepdim=True) if renormalize else weights), ids


def moe_inputs(tokens: int, experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype,
               device: str, gen: torch.Generator, logits_dtype: torch.dtype | None = None):
    """``(x, w13, w2, logits)``; the router never picks the last expert (and, with more than
    ``top_k + 1`` experts, the first), so some experts receive 0 tokens. ``logits_dtype``
    (default ``dtype``): fp32 logits have no ties, where bf16 ones tie often enough that two
    correct top-k implementations pick different experts (torch's order among ties is
    unspecified on CUDA)."""
    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype=dtype, device=device)

    x = rand(tokens, hidden)
    w13 = rand(experts, 2 * inter, hidden, std=hidden ** -0.5)
    w2 = rand(experts, hidden, inter, std=inter ** -0.5)
    logits = torch.randn(tokens, experts, generator=gen) * 2
    logits[:, -1] = -1e4
    if experts > top_k + 1:
        logits[:, 0] = -1e4
    return x, w13, w2, logits.to(dtype=logits_dtype or dtype, device=device)
