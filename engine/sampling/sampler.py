"""Batched sampling: one set of tensors for the whole batch, no per-request loop over logits.

On CUDA nothing here waits for the device: the per-request parameters go up through pinned
memory without a sync, sizes come from host-side fields of ``SamplingBatchInfo``, and the
filters and the draw are plain tensor ops; the caller's copy of the sampled ids is the
step's only sync (tests/gpu/test_sampling_gpu.py checks this with sync-debug mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from radixfleet.engine.memory.transfer import to_device
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
    # Host copy: the largest top-k if every row has a top-k cut (then the top-k window
    # holds every row's kept tokens), else 0.
    top_k_window: int = 0

    @classmethod
    def build(cls, params: list[SamplingParams], vocab_size: int, device,
              positions: list[int] | None = None) -> SamplingBatchInfo:
        """``positions``: each request's output length, which makes seeded draws
        reproducible whatever else shares the batch."""
        positions = positions or [0] * len(params)
        top_ks = [vocab_size if p.top_k < 0 else min(p.top_k, vocab_size) for p in params]
        return cls(
            temperatures=to_device([p.temperature for p in params], torch.float32, device).unsqueeze(1),
            top_ps=to_device([p.top_p for p in params], torch.float32, device),
            top_ks=to_device(top_ks, torch.int64, device),
            min_ps=to_device([p.min_p for p in params], torch.float32, device),
            all_greedy=all(p.is_greedy for p in params),
            need_top_p=any(p.top_p < 1 for p in params),
            need_top_k=any(k < vocab_size for k in top_ks),
            need_min_p=any(p.min_p > 0 for p in params),
            seeded=[(i, seed_for_step(p.seed, pos)) for i, (p, pos) in enumerate(zip(params, positions, strict=True))
                    if p.seed is not None and not p.is_greedy],
            top_k_window=max(top_ks) if top_ks and max(top_ks) < vocab_size else 0,
        )


def seed_for_step(seed: int, position: int) -> int:
    """A distinct 63-bit seed per (request seed, output position); stable across processes."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def sample(logits: torch.Tensor, info: SamplingBatchInfo,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] fp32 → next token ids [B] int64.

    Draws by the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with
    probability p_i. Unseeded rows share one batched draw of E; a seeded row redraws its
    row of E from its own generator (seeded by request seed and output position)."""
    if info.all_greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / info.temperatures, dim=-1)
    if info.need_top_k or info.need_top_p or info.need_min_p:
        probs = filter_probs(probs, info)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, seed in info.seeded:
        g = torch.Generator(device=probs.device)
        g.manual_seed(seed)
        noise[row].exponential_(generator=g)
    return (probs / noise).argmax(dim=-1)


_CANDIDATES = 1024  # top-p / min-p look at the best tokens first; full sort only if needed


def filter_probs(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Zero out tokens outside top-k, the top-p nucleus and below min-p × max prob."""
    if probs.device.type == "cpu":
        return _filter_windowed(probs, info)
    return _filter_sync_free(probs, info)


def _filter_sync_free(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Every row at once; the window is chosen on the host: the top-k window when every
    row has a top-k cut, else a full sort (cheap on a GPU)."""
    vocab = probs.shape[-1]
    k = info.top_k_window
    if 0 < k < vocab:
        cand, order = probs.topk(k, dim=-1)  # [B, K] sorted, descending
    else:
        cand, order = probs.sort(dim=-1, descending=True)
    kept = _keep_sorted(cand, info.top_ks, info.top_ps, info.min_ps)
    return torch.zeros_like(probs).scatter_(-1, order, kept)


def _keep_sorted(cand: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                 min_ps: torch.Tensor) -> torch.Tensor:
    """``cand`` [b, K] sorted descending → the same with the filtered-out tokens zeroed."""
    ranks = torch.arange(cand.shape[-1], device=cand.device)[None, :]
    drop = ranks >= top_ks[:, None]
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays);
    # top_p = 1 keeps everything, whatever the rounding of the running sum.
    drop |= ((cand.cumsum(dim=-1) - cand) > top_ps[:, None]) & (top_ps[:, None] < 1)
    drop |= cand < cand[:, :1] * min_ps[:, None]
    drop[:, 0] = False
    return cand.masked_fill(drop, 0.0)


def _filter_windowed(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """CPU: only the filtered rows, on their K best tokens (K = the largest top-k, at
    least 1024), falling back to a full sort only when some row's kept set may extend
    beyond them (data-dependent checks: free on the CPU, a sync on a GPU)."""
    vocab = probs.shape[-1]
    rows = (info.top_ks < vocab) | (info.top_ps < 1) | (info.min_ps > 0)  # [B] rows to filter
    top_ks, top_ps, min_ps = info.top_ks[rows], info.top_ps[rows], info.min_ps[rows]
    sub = probs[rows]
    k = min(vocab, max(_CANDIDATES, int(top_ks[top_ks < vocab].max()) if bool((top_ks < vocab).any()) else 0))
    cand, order = sub.topk(k, dim=-1)  # [b, K] sorted, descending
    if k < vocab:
        exact = (top_ks <= k) | (cand.sum(-1) >= top_ps) | (cand[:, -1] < cand[:, 0] * min_ps)
        if not bool(exact.all()):
            cand, order = sub.sort(dim=-1, descending=True)
    kept = torch.zeros_like(sub).scatter_(-1, order, _keep_sorted(cand, top_ks, top_ps, min_ps))
    out = probs.clone()
    out[rows] = kept
    return out
