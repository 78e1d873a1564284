"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocab."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixfleet.engine.layers import distributed as dist
from radixfleet.engine.layers.linear import PackableWeight, matmul


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        tp = dist.tp_size()
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp)
        self.start = dist.tp_rank() * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        part = loaded[self.start:self.start + self.per_rank]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if dist.tp_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * mask.unsqueeze(-1)
        return dist.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding, PackableWeight):
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] → logits [B, vocab] in fp32 (gathered across ranks)."""
        local = matmul(hidden, self.weight, None, self.packed)
        return dist.all_gather_last_dim(local).float()[:, : self.vocab_size]
