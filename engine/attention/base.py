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
from typing import TYPE_CHECKING

import torch

from radixfleet.engine.memory.kv_pool import KVPool

if TYPE_CHECKING:
    from radixfleet.engine.executor.forward_batch import ForwardBatch


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

    # Whether ``forward`` takes ``rope=(positions, cos_sin_table, qk_norm)`` and rotates q and
    # k itself as it stores k/v (the GPU backends: ``kernels/rotary.py``'s rotary_store_kv_).
    fuses_rope = False

    # Per-layer options, set once by ``configure`` after construction: each layer's sliding
    # window (a query at position p sees keys at p - window + 1 .. p; None: the whole
    # context) and a soft cap on the scaled attention logits (``cap * tanh(s / cap)``, Gemma 2).
    # A backend that implements them sets these flags; others refuse such a model.
    supports_sliding_window = False
    supports_logit_cap = False
    sliding_windows: tuple[int | None, ...] = ()
    logit_cap: float | None = None

    def configure(self, sliding_windows: tuple[int | None, ...], logit_cap: float | None) -> None:
        """Set the per-layer options; ``ValueError`` naming a backend that can, where this one cannot."""
        name = type(self).__name__
        if any(w is not None for w in sliding_windows) and not self.supports_sliding_window:
            windows = sorted({w for w in sliding_windows if w is not None})
            raise ValueError(f"this model uses sliding-window attention (windows {windows}), which "
                             f"{name} does not implement; use attention_backend='torch_native'")
        if logit_cap is not None and not self.supports_logit_cap:
            raise ValueError(f"this model soft-caps its attention logits (cap {logit_cap}), which {name} "
                             "does not implement; use attention_backend='torch_native'")
        self.sliding_windows = tuple(sliding_windows)
        self.logit_cap = logit_cap

    def window(self, layer_id: int) -> int | None:
        """``layer_id``'s sliding window, or None for full attention."""
        return self.sliding_windows[layer_id] if self.sliding_windows else None

    def plan(self, batch: ForwardBatch) -> None:
        """Prepare per-step metadata once before the layers run (default: nothing)."""
        return None

    def _store_with_kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                           batch: ForwardBatch, rope: tuple | None):
        """The GPU backends' common first step: q/k/v as ``[T, heads, D]`` views, the new
        tokens' k/v written to their slots by one triton launch (``kernels/kv_store.py``), or,
        with ``rope = (positions, cos_sin_table, qk_norm)``, rotary applied to q and k in the
        same launch (``kernels/rotary.py``), after per-head q/k RMSNorms when ``qk_norm`` is
        ``(wq, wk, eps)`` rather than None.
        Returns ``(q, k_buffer, v_buffer)`` of ``layer_id``."""
        from radixfleet.kernels.kv_store import store_kv
        from radixfleet.kernels.rotary import rotary_store_kv_

        pool = self.kv_pool
        k_buf, v_buf = pool.k_buffers[layer_id], pool.v_buffers[layer_id]
        scales = (pool.k_scales[layer_id], pool.v_scales[layer_id])  # fp8 caches only
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if rope is None:
            store_kv(k, v, k_buf, v_buf, batch.out_cache_loc, *scales)
        else:
            positions, table, qk_norm = rope
            rotary_store_kv_(positions, q, k, v, table, k_buf, v_buf, batch.out_cache_loc, *scales,
                             qk_norm=qk_norm)
        return q, k_buf, v_buf

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch) -> torch.Tensor:
        """q ``[T, H, D]``, k/v ``[T, KVH, D]`` → output ``[T, H, D]``; stores k/v first.
        Backends with ``fuses_rope`` also take ``rope=(positions, cos_sin_table, qk_norm)``."""
