"""The attention-backend interface every backend implements.

KV layout (token-slot, page size 1): each layer owns ``k_buffer`` and ``v_buffer`` of shape
``[num_slots, num_kv_heads, head_dim]`` in the model dtype, on the model's device. A request's
tokens live at the slots listed in ``req_to_token[req_pool_idx, :seq_len]`` (int32 table of
shape ``[max_running_requests, max_context_len]``). Slot 0 is reserved as a padding slot.

Call order per forward step: ``plan(batch)`` once, then ``forward(q, k, v, layer_id, batch)``
per layer. ``forward`` first writes the new tokens' k/v into the cache at
``batch.out_cache_loc`` and then attends over the request's whole context (cached prefix plus
the new tokens, causal among the new tokens).
"""

from __future__ import annotations

import abc
import enum
import itertools
from dataclasses import dataclass

import torch

from radixfleet.engine.transfer import to_device


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
        sync (``engine/transfer.py``); positions and lengths are derived."""
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


class KVPool:
    """Per-layer K and V buffers, ``[num_slots, num_kv_heads, head_dim]`` each.

    On CPU, a layer's K and V are interleaved in one ``[num_slots, 2, num_kv_heads, head_dim]``
    tensor (``kv_buffers``; ``k_buffers``/``v_buffers`` are strided views of it), so the
    torch_native decode gathers a request's keys and values in one ``index_select``.
    Elsewhere ``kv_buffers`` is None and K and V are separate contiguous tensors.
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, interleave: bool | None = None):
        shape = (num_slots, num_kv_heads, head_dim)
        if interleave is None:
            interleave = torch.device(device).type == "cpu"
        self.kv_buffers: list[torch.Tensor] | None = None
        if interleave:
            self.kv_buffers = [torch.zeros((num_slots, 2, num_kv_heads, head_dim), dtype=dtype, device=device)
                               for _ in range(num_layers)]
            self.k_buffers = [kv[:, 0] for kv in self.kv_buffers]
            self.v_buffers = [kv[:, 1] for kv in self.kv_buffers]
        else:
            self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots

    def store(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffers[layer_id].index_copy_(0, loc, k.to(self.k_buffers[layer_id].dtype))
        self.v_buffers[layer_id].index_copy_(0, loc, v.to(self.v_buffers[layer_id].dtype))

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


class AttentionBackend(abc.ABC):
    """One implementation per kernel family; chosen by name through ``ATTENTION_BACKENDS``."""

    def __init__(self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.kv_pool = kv_pool
        self.device = kv_pool.k_buffers[0].device
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    # Whether ``forward`` takes ``rope=(positions, cos_sin_table)`` and rotates q and k itself
    # as it stores k/v (the GPU backends: ``kernels/rotary.py``'s rotary_store_kv_).
    fuses_rope = False

    def plan(self, batch: ForwardBatch) -> None:
        """Prepare per-step metadata once before the layers run (default: nothing)."""
        return None

    def _store_with_kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                           batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor] | None):
        """The GPU backends' common first step: q/k/v as ``[T, heads, D]`` views, the new
        tokens' k/v written to their slots by one triton launch (``kernels/kv_store.py``), or,
        with ``rope``, rotary applied to q and k in the same launch (``kernels/rotary.py``).
        Returns ``(q, k_buffer, v_buffer)`` of ``layer_id``."""
        from radixfleet.kernels.kv_store import store_kv
        from radixfleet.kernels.rotary import rotary_store_kv_

        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if rope is None:
            store_kv(k, v, k_buf, v_buf, batch.out_cache_loc)
        else:
            rotary_store_kv_(rope[0], q, k, v, rope[1], k_buf, v_buf, batch.out_cache_loc)
        return q, k_buf, v_buf

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch) -> torch.Tensor:
        """q ``[T, H, D]``, k/v ``[T, KVH, D]`` → output ``[T, H, D]``; stores k/v first.
        Backends with ``fuses_rope`` also take ``rope=(positions, cos_sin_table)``."""
