"""Batched sampling: one set of tensors for the whole batch, no per-request loop over logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixfleet.engine.sampling.params import SamplingParams


@dataclass
class SamplingBatchInfo:
    temperatures: torch.Tensor  # [B, 1] float32
    top_ps: torch.Tensor  # [B] float32
    top_ks: torch.Tensor  # [B] int64 (vocab size when disabled)
    min_ps: torch.Tensor  # [B] float32
    all_greedy: bool
    need_top_p: bool
    need_top_k: bool
    need_min_p: bool

    @classmethod
    def build(cls, params: list[SamplingParams], vocab_size: int, device) -> SamplingBatchInfo:
        top_ks = [vocab_size if p.top_k < 0 else min(p.top_k, vocab_size) for p in params]
        return cls(
            temperatures=torch.tensor([p.temperature for p in params], dtype=torch.float32,
                                      device=device).unsqueeze(1),
            top_ps=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            top_ks=torch.tensor(top_ks, dtype=torch.int64, device=device),
            min_ps=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
            all_greedy=all(p.is_greedy for p in params),
            need_top_p=any(p.top_p < 1 for p in params),
            need_top_k=any(k < vocab_size for k in top_ks),
            need_min_p=any(p.min_p > 0 for p in params),
        )


def sample(logits: torch.Tensor, info: SamplingBatchInfo,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] fp32 → next token ids [B] int64."""
    if info.all_greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / info.temperatures, dim=-1)
    if info.need_top_k or info.need_top_p or info.need_min_p:
        probs = filter_probs(probs, info)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def filter_probs(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Zero out tokens outside top-k, the top-p nucleus and below min-p × max prob."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    drop = ranks >= info.top_ks[:, None]
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before > info.top_ps[:, None]
    drop |= sorted_probs < sorted_probs[:, :1] * info.min_ps[:, None]
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
