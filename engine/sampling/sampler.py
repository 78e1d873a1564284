"""Batched sampling: one set of tensors for the whole batch, no per-request loop over logits."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # Rows with a per-request seed: (row, seed mixed with the output position).
    seeded: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def build(cls, params: list[SamplingParams], vocab_size: int, device,
              positions: list[int] | None = None) -> SamplingBatchInfo:
        """``positions``: each request's output length, which makes seeded draws
        reproducible whatever else shares the batch."""
        positions = positions or [0] * len(params)
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
            seeded=[(i, seed_for_step(p.seed, pos)) for i, (p, pos) in enumerate(zip(params, positions, strict=True))
                    if p.seed is not None and not p.is_greedy],
        )


def seed_for_step(seed: int, position: int) -> int:
    """A distinct 63-bit seed per (request seed, output position); stable across processes."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def sample(logits: torch.Tensor, info: SamplingBatchInfo,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] fp32 → next token ids [B] int64."""
    if info.all_greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / info.temperatures, dim=-1)
    if info.need_top_k or info.need_top_p or info.need_min_p:
        probs = filter_probs(probs, info)
    next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    # Seeded rows draw again from their own generator (only those rows loop).
    for row, seed in info.seeded:
        g = torch.Generator(device=probs.device)
        g.manual_seed(seed)
        next_ids[row] = torch.multinomial(probs[row], 1, generator=g)[0]
    return next_ids


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
