"""Attention backend on FlashInfer's paged kernels (CUDA only, fp16 / bf16 / fp8 e4m3 KV).

This module imports flashinfer (and triton) at the top: the registry imports it only when
the ``flashinfer`` backend is chosen, so other installs never load either.

Page size 1: a request's "pages" are its KV slots. ``plan`` runs once per step: it builds
``kv_indptr`` on the host from ``seq_lens_cpu`` and ``kv_indices`` on the device from
``req_to_token`` (``kernels/kv_indices.py``, no device sync), then plans one wrapper:

* decode: ``BatchDecodeWithPagedKVCacheWrapper``, on tensor cores when the GQA group is
  >= 4 query heads per kv head (the CUDA-core decode kernel wins for small groups);
* extend: ``BatchPrefillWithPagedKVCacheWrapper``, causal. FlashInfer aligns the queries to
  the end of each context, so query i of a request sits at position ``prefix + i``.

``forward`` stores k/v at ``out_cache_loc`` and runs the planned wrapper for its layer.

Sliding windows: one wrapper per distinct window of the model's layers (e.g. Gemma's local
and global layers), each planned every step over the same indices with ``window_left =
window - 1`` (flashinfer's window is inclusive of the query's own position); the layer's
window picks the wrapper. A soft cap on the logits (Gemma 2) is ``logits_soft_cap``.

CUDA graphs: a batch with ``cuda_graph=True`` (the graph runner's padded decode batch) is
planned on a per-batch-size wrapper made with ``use_cuda_graph=True`` over fixed indptr /
indices / last-page-len buffers. The runner plans before capturing and again before every
replay (outside the graph) with the real host lengths; planning rewrites the buffers and
the split-KV schedule that the captured kernels read. Call ``reserve(max_batch_size)``
before capturing so the shared indices buffer is sized once.
"""

from __future__ import annotations

import itertools

import flashinfer
import torch

from radixfleet.engine.attention.base import AttentionBackend
from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode
from radixfleet.engine.memory.kv_pool import KVPool
from radixfleet.kernels.kv_indices import build_kv_indices

WORKSPACE_BYTES = 128 << 20  # split-KV partial outputs; shared by every wrapper (one stream)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn)
# FA2 kernels on every architecture: one JIT module serves prefill and tensor-core decode.
KERNEL_BACKEND = "fa2"
TENSOR_CORE_MIN_GROUP = 4


def host_indptr(lens: list[int]) -> torch.Tensor:
    """Exclusive prefix sum ``[0, l0, l0 + l1, ...]`` as a CPU int32 tensor [B + 1]."""
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


class FlashInferBackend(AttentionBackend):
    fuses_rope = True
    supports_sliding_window = True  # window_left, logits_soft_cap
    supports_logit_cap = True

    def __init__(self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float):
        super().__init__(kv_pool, num_heads, num_kv_heads, head_dim, scale)
        self.dtype = kv_pool.k_buffers[0].dtype
        self.q_dtype = kv_pool.model_dtype
        if self.device.type != "cuda":
            raise ValueError("the flashinfer attention backend needs a CUDA device; use torch_native")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"flashinfer attention supports float16, bfloat16 and fp8 e4m3 KV caches, not "
                             f"{self.dtype}; use attention_backend='triton' or 'torch_native'")
        self.use_tensor_cores = num_heads // num_kv_heads >= TENSOR_CORE_MIN_GROUP
        # "Must be initialized to 0 for its first use" (flashinfer docs).
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        # (mode, window) -> eager wrapper, made at the first step that needs it; all share the
        # float workspace (runs are sequential on one stream), each has its own plan buffers.
        self._wrappers: dict[tuple[ForwardMode, int | None], object] = {}
        # Eager steps: device indptr / indices, grow-only.
        self._indptr = torch.zeros(0, dtype=torch.int32, device=self.device)
        self._indices = torch.zeros(0, dtype=torch.int32, device=self.device)
        # CUDA-graph state (see the module docstring); buffers allocated at the first graph plan.
        self._graph_max_bs = 0
        self._graph_wrappers: dict[tuple[int, int | None], flashinfer.BatchDecodeWithPagedKVCacheWrapper] = {}
        self._graph_indptr: torch.Tensor | None = None  # [max_bs + 1] int32
        self._graph_indices: torch.Tensor | None = None  # [max_bs * max_context] int32
        self._graph_last_page_len: torch.Tensor | None = None  # [max_bs] int32, all ones
        self._active: dict[int | None, object] = {}  # window -> the wrapper planned for this step

    # ---- planning ------------------------------------------------------------------------
    def reserve(self, max_batch_size: int) -> None:
        """Size the CUDA-graph buffers for every batch size up to ``max_batch_size``."""
        if self._graph_indices is not None and max_batch_size > self._graph_max_bs:
            raise ValueError("reserve() must come before the first CUDA-graph plan")
        self._graph_max_bs = max(self._graph_max_bs, max_batch_size)

    def plan(self, batch: ForwardBatch) -> None:
        bs = batch.batch_size
        if len(batch.seq_lens_cpu) != bs or len(batch.extend_seq_lens_cpu) != bs:
            raise ValueError("the host copies of the batch's lengths disagree on the batch size")
        if batch.mode is ForwardMode.DECODE and batch.cuda_graph:
            self._plan_graph(batch)
            return
        kv_indptr = host_indptr(batch.seq_lens_cpu)
        total = int(kv_indptr[-1])
        if self._indptr.numel() < bs + 1:
            self._indptr = torch.zeros(2 * bs + 1, dtype=torch.int32, device=self.device)
        if self._indices.numel() < total:
            self._indices = torch.zeros(2 * total, dtype=torch.int32, device=self.device)
        indptr_dev = self._indptr[:bs + 1]
        indptr_dev.copy_(kv_indptr, non_blocking=True)
        build_kv_indices(batch.req_to_token, batch.req_pool_indices, indptr_dev, self._indices)
        indices = self._indices[:total]
        last_page_len = torch.ones(bs, dtype=torch.int32)
        if batch.mode is ForwardMode.DECODE:
            self._active = {}
            for w in self._windows():
                wrapper = self._wrapper(ForwardMode.DECODE, w)
                wrapper.plan(kv_indptr, indices, last_page_len, self.num_heads, self.num_kv_heads,
                             self.head_dim, 1, **self._plan_kwargs(w))
                self._active[w] = wrapper
            return
        qo_indptr = host_indptr(batch.extend_seq_lens_cpu)
        if int(qo_indptr[-1]) != batch.out_cache_loc.shape[0]:
            raise ValueError(f"extend_seq_lens_cpu sums to {int(qo_indptr[-1])} but the batch has "
                             f"{batch.out_cache_loc.shape[0]} new tokens")
        if any(n > s for n, s in zip(batch.extend_seq_lens_cpu, batch.seq_lens_cpu, strict=True)):
            raise ValueError("a request extends by more tokens than its sequence length")
        self._active = {}
        for w in self._windows():
            wrapper = self._wrapper(ForwardMode.EXTEND, w)
            wrapper.plan(qo_indptr, kv_indptr, indices, last_page_len, self.num_heads,
                         self.num_kv_heads, self.head_dim, 1, causal=True, **self._plan_kwargs(w))
            self._active[w] = wrapper

    def _windows(self) -> list[int | None]:
        """The distinct windows of the layers (None: full attention), one wrapper each."""
        return sorted(set(self.sliding_windows) or {None}, key=lambda w: -1 if w is None else w)

    def _wrapper(self, mode: ForwardMode, window: int | None):
        key = (mode, window)
        if key not in self._wrappers:
            if mode is ForwardMode.DECODE:
                self._wrappers[key] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores,
                    backend=KERNEL_BACKEND)
            else:
                self._wrappers[key] = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                    self.workspace, "NHD", backend=KERNEL_BACKEND)
        return self._wrappers[key]

    def _plan_kwargs(self, window: int | None) -> dict:
        # q is in the model dtype; an fp8 cache is read as fp8 and scaled at run().
        return dict(q_data_type=self.q_dtype, kv_data_type=self.dtype, sm_scale=self.scale,
                    window_left=-1 if window is None else window - 1,
                    logits_soft_cap=self.logit_cap)

    def _plan_graph(self, batch: ForwardBatch) -> None:
        bs = batch.batch_size
        if self._graph_indices is None:
            self._graph_max_bs = max(self._graph_max_bs, bs)
            n = self._graph_max_bs
            # Shared by every batch size's wrapper: only one graph replays at a time and
            # each replay is planned first.
            self._graph_indptr = torch.zeros(n + 1, dtype=torch.int32, device=self.device)
            self._graph_indices = torch.zeros(n * batch.req_to_token.shape[1], dtype=torch.int32,
                                              device=self.device)
            self._graph_last_page_len = torch.ones(n, dtype=torch.int32, device=self.device)
        if bs > self._graph_max_bs:
            raise ValueError(f"CUDA-graph batch size {bs} exceeds the reserved {self._graph_max_bs}")
        kv_indptr = host_indptr(batch.seq_lens_cpu)
        total = int(kv_indptr[-1])
        if total > self._graph_indices.numel():
            raise ValueError(f"{total} context tokens exceed the CUDA-graph indices buffer "
                             f"({self._graph_indices.numel()})")
        indptr_dev = self._graph_indptr[:bs + 1]
        indptr_dev.copy_(kv_indptr, non_blocking=True)
        build_kv_indices(batch.req_to_token, batch.req_pool_indices, indptr_dev, self._graph_indices)
        self._active = {}
        for w in self._windows():  # one wrapper per (batch size, window), sharing the buffers
            wrapper = self._graph_wrappers.get((bs, w))
            if wrapper is None:
                wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace, "NHD", use_cuda_graph=True,
                    use_tensor_cores=self.use_tensor_cores,
                    paged_kv_indptr_buffer=self._graph_indptr[:bs + 1],
                    paged_kv_indices_buffer=self._graph_indices,
                    paged_kv_last_page_len_buffer=self._graph_last_page_len[:bs],
                    backend=KERNEL_BACKEND)
                self._graph_wrappers[(bs, w)] = wrapper
            # plan() copies indices into its buffer: here the same memory, which copy_ skips.
            wrapper.plan(kv_indptr, self._graph_indices[:total], torch.ones(bs, dtype=torch.int32),
                         self.num_heads, self.num_kv_heads, self.head_dim, 1, **self._plan_kwargs(w))
            self._active[w] = wrapper

    # ---- per layer -----------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch, rope=None) -> torch.Tensor:
        assert self._active, "plan() must run before forward()"
        wrapper = self._active[self.window(layer_id)]
        q, k_buf, v_buf = self._store_with_kernel(q, k, v, layer_id, batch, rope)
        # 3-D [S, KVH, D] caches are read as [S, page_size=1, KVH, D] ("NHD").
        if self.kv_pool.is_fp8:
            return wrapper.run(q, (k_buf, v_buf), k_scale=self.kv_pool.k_scales[layer_id],
                               v_scale=self.kv_pool.v_scales[layer_id])
        return wrapper.run(q, (k_buf, v_buf))
