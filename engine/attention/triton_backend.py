"""Attention backend on the triton kernels of ``radixfleet.kernels`` (CUDA only).

This module imports triton at the top: the registry imports it only when the ``triton``
backend is chosen, so CPU-only installs never load triton.

Per step, ``plan`` computes what every layer shares: for extend, each request's start offset
in the packed q and the longest extend length (from the host copy, no device sync); for
decode, the split-K count (a function of the batch size alone, so graph-safe) and scratch
views. ``forward`` stores k/v at ``out_cache_loc`` and then attends.

CUDA graphs: call ``reserve(max_batch_size)`` before capturing, so the decode scratch is
allocated once and never moves under a captured graph. A larger batch afterwards (run
without a graph) gets scratch of its own for that step: replacing the reserved buffers
would leave the graphs writing into freed memory that other tensors then own.
"""

from __future__ import annotations

import os

import torch

from radixfleet.engine.attention.base import AttentionBackend
from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode
from radixfleet.engine.memory.kv_pool import KVPool
from radixfleet.kernels.decode_attention import choose_num_kv_splits, decode_attention
from radixfleet.kernels.extend_attention import extend_attention


class TritonAttentionBackend(AttentionBackend):
    fuses_rope = True
    supports_sliding_window = True  # the kernels' `window` and `logit_cap`
    supports_logit_cap = True

    def __init__(self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float):
        super().__init__(kv_pool, num_heads, num_kv_heads, head_dim, scale)
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton attention backend needs a CUDA device; use torch_native")
        # Decode split-K scratch, grow-only (see `reserve`): fp32 partial outputs and lse.
        self._mid_o = torch.empty(0, dtype=torch.float32, device=self.device)
        self._mid_lse = torch.empty(0, dtype=torch.float32, device=self.device)
        # The decode kernel's per-(request, kv head) merge counters; every launch leaves them 0.
        self._semaphore = torch.zeros(0, dtype=torch.int32, device=self.device)
        self._reserved = False  # set by `reserve`: the scratch buffers may no longer move
        self._num_kv_splits = 1
        self._q_start: torch.Tensor | None = None
        self._max_extend_len = 0

    def reserve(self, max_batch_size: int) -> None:
        """Allocate decode scratch for every batch size up to ``max_batch_size``, for good."""
        for bs in (1, max_batch_size):
            self._scratch(bs, choose_num_kv_splits(bs, self.num_kv_heads, self.device))
        self._reserved = True

    def _scratch(self, bs: int, splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views ``(mid_o, mid_lse, semaphore)`` for a decode step of ``bs`` requests."""
        n = bs * self.num_heads * splits
        mid_o, mid_lse, semaphore = self._mid_o, self._mid_lse, self._semaphore
        if mid_lse.numel() < n or semaphore.numel() < bs * self.num_kv_heads:
            mid_o = torch.empty(n * self.head_dim, dtype=torch.float32, device=self.device)
            mid_lse = torch.empty(n, dtype=torch.float32, device=self.device)
            semaphore = torch.zeros(bs * self.num_kv_heads, dtype=torch.int32, device=self.device)
            if not self._reserved:  # else: this step's own (see the module docstring)
                self._mid_o, self._mid_lse, self._semaphore = mid_o, mid_lse, semaphore
        return (mid_o[: n * self.head_dim].view(bs, self.num_heads, splits, self.head_dim),
                mid_lse[:n].view(bs, self.num_heads, splits), semaphore)

    def plan(self, batch: ForwardBatch) -> None:
        bs = batch.batch_size
        if batch.mode is ForwardMode.DECODE:
            self._num_kv_splits = choose_num_kv_splits(bs, self.num_kv_heads, self.device)
            self._decode_scratch = self._scratch(bs, self._num_kv_splits)
            return
        if len(batch.extend_seq_lens_cpu) != bs or sum(batch.extend_seq_lens_cpu) != len(batch.out_cache_loc):
            raise ValueError("extend_seq_lens_cpu does not match the batch's new tokens")
        lens = batch.extend_seq_lens
        # Exclusive prefix sum on the device: start of each request's tokens in the packed q.
        self._q_start = torch.cumsum(lens, 0, dtype=torch.int32) - lens.to(torch.int32)
        self._max_extend_len = max(batch.extend_seq_lens_cpu, default=0)
        self._max_seq_len = max(batch.seq_lens_cpu, default=0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch, rope=None) -> torch.Tensor:
        q, k_buf, v_buf = self._store_with_kernel(q, k, v, layer_id, batch, rope)
        k_scale, v_scale = self.kv_pool.k_scales[layer_id], self.kv_pool.v_scales[layer_id]  # fp8 caches
        if batch.mode is ForwardMode.DECODE:
            mid_o, mid_lse, semaphore = self._decode_scratch
            return decode_attention(
                q, k_buf, v_buf, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                self.scale, num_kv_splits=self._num_kv_splits, mid_o=mid_o, mid_lse=mid_lse,
                semaphore=semaphore, window=self.window(layer_id), logit_cap=self.logit_cap,
                k_scale=k_scale, v_scale=v_scale)
        assert self._q_start is not None, "plan() must run before forward()"
        window = self.window(layer_id)
        if window is not None and window >= self._max_seq_len:
            window = None  # covers every context of the step: the unmasked tiles stay unmasked
        return extend_attention(
            q, k_buf, v_buf, batch.req_to_token, batch.req_pool_indices, self._q_start,
            batch.extend_prefix_lens, batch.extend_seq_lens, self._max_extend_len, self.scale,
            window=window, logit_cap=self.logit_cap, k_scale=k_scale, v_scale=v_scale)
