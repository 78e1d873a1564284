"""The tensors of one model step (``ForwardBatch``), built from the scheduler's batch.

The step executor builds one from the requests' host state (``from_host``); the model
runner sets ``attn_backend``; attention backends plan and run from it; CUDA graphs pad it.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from radixfleet.engine.memory.transfer import to_device

if TYPE_CHECKING:
    from radixfleet.engine.attention.base import AttentionBackend


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill / chunked prefill: new tokens after a (possibly empty) cached prefix
    DECODE = "decode"  # one new token per request


@dataclass
class ForwardBatch:
    """Tensors describing one model step; built by the model runner from a scheduled batch.

    B = number of requests, T = number of new tokens in this step (B for decode).
    """

    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each new token in its sequence
    req_pool_indices: torch.Tensor  # [B] int64, rows of req_to_token
    seq_lens: torch.Tensor  # [B] int32, context length after this step (prefix + new)
    extend_prefix_lens: torch.Tensor  # [B] int32, cached tokens before this step (decode: seq_len-1)
    extend_seq_lens: torch.Tensor  # [B] int32, new tokens per request (decode: 1)
    out_cache_loc: torch.Tensor  # [T] int64, KV slots the new tokens are written to
    req_to_token: torch.Tensor  # [max_running_requests, max_context_len] int32
    # Host copies, so backends can plan without a device sync.
    seq_lens_cpu: list[int]
    extend_prefix_lens_cpu: list[int]
    extend_seq_lens_cpu: list[int]
    attn_backend: AttentionBackend | None = None  # set by the model runner before forward
    # A decode batch padded to a captured size and run through a CUDA graph (set by the
    # graph runner): backends that plan into fixed buffers use their graph state for it.
    cuda_graph: bool = False
    # Host copies of the ids, rows and slots when the batch was built from host data
    # (``from_host``; input ids stay None when they only exist on the device, e.g. decode ids
    # sampled by a step still running): tensor parallelism sends these to the other ranks.
    input_ids_cpu: torch.Tensor | None = None
    req_pool_indices_cpu: torch.Tensor | None = None
    out_cache_loc_cpu: torch.Tensor | None = None
    # Each request's LoRA adapter index (0: none); None when no request uses one.
    lora_ids: list[int] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    def last_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The rows of ``hidden`` [T, ...] (every new token) that hold each request's last
        new token → [B, ...]."""
        ends = itertools.accumulate(self.extend_seq_lens_cpu)
        return hidden[to_device([e - 1 for e in ends], torch.int64, hidden.device)]

    @classmethod
    def from_host(cls, mode: ForwardMode, input_ids: list[int] | torch.Tensor | None, rows: list[int],
                  out_cache_loc: torch.Tensor, req_to_token: torch.Tensor, prefix_lens: list[int],
                  extend_lens: list[int]) -> ForwardBatch:
        """A batch whose requests (``req_to_token`` rows ``rows``) each add ``extend_lens[i]``
        tokens after ``prefix_lens[i]`` cached ones, at the slots ``out_cache_loc`` (host).
        ``input_ids`` are host data, or None when the caller sets them on the device afterwards
        (decode ids sampled by a step still running). Everything is uploaded without a device
        sync (``engine/memory/transfer.py``); positions and lengths are derived."""
        dev = req_to_token.device
        seq = [p + e for p, e in zip(prefix_lens, extend_lens, strict=True)]
        positions = [i for p, e in zip(prefix_lens, extend_lens, strict=True) for i in range(p, p + e)]
        ids_cpu = None if input_ids is None else torch.as_tensor(input_ids, dtype=torch.int64)
        rows_cpu = torch.as_tensor(rows, dtype=torch.int64)
        loc_cpu = torch.as_tensor(out_cache_loc, dtype=torch.int64)
        ids = torch.empty(0, dtype=torch.int64, device=dev) if ids_cpu is None else to_device(ids_cpu, torch.int64, dev)
        return cls(mode=mode, input_ids=ids,
                   positions=to_device(positions, torch.int64, dev),
                   req_pool_indices=to_device(rows_cpu, torch.int64, dev),
                   seq_lens=to_device(seq, torch.int32, dev),
                   extend_prefix_lens=to_device(prefix_lens, torch.int32, dev),
                   extend_seq_lens=to_device(extend_lens, torch.int32, dev),
                   out_cache_loc=to_device(loc_cpu, torch.int64, dev), req_to_token=req_to_token,
                   seq_lens_cpu=seq, extend_prefix_lens_cpu=list(prefix_lens),
                   extend_seq_lens_cpu=list(extend_lens), input_ids_cpu=ids_cpu,
                   req_pool_indices_cpu=rows_cpu, out_cache_loc_cpu=loc_cpu)
