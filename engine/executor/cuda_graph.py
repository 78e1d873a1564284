"""CUDA graphs for decode steps: one graph per padded batch size, replayed with the step's
inputs copied into static buffers.

Padding rows decode a dummy token at the padding slot 0 with a context of one token, so
they never touch a real request's KV. Graphs share one memory pool; the attention backend
reserves its scratch for the largest batch before capture (``reserve``), so no captured
pointer moves afterwards.

Batches built here carry ``cuda_graph=True`` and, at replay, the real host sequence lengths
(padding rows: 1): the backend's ``plan`` runs outside the graph before every replay, and
backends whose kernels read a per-step schedule from fixed buffers (flashinfer) rewrite it
there.
"""

from __future__ import annotations

import bisect
import logging

import torch

from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)


def capture_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_bs + 1, 8))
    return sorted({s for s in sizes if s <= max_bs} | {max_bs})


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, backend, req_to_token: torch.Tensor, max_bs: int,
                 device: torch.device):
        self.model = model
        self.backend = backend
        self.req_to_token = req_to_token
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.req_pool_indices = torch.zeros(n, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.out_cache_loc = torch.zeros(n, dtype=torch.int64, device=device)
        self.ones = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if hasattr(backend, "reserve"):
            backend.reserve(self.max_bs)
        self._capture()

    def _batch(self, bs: int, seq_lens_cpu: list[int] | None = None) -> ForwardBatch:
        """The static buffers' first ``bs`` rows as a decode batch; ``seq_lens_cpu`` must
        match what ``self.seq_lens[:bs]`` holds (default: all 1, the capture-time state)."""
        seq_lens_cpu = seq_lens_cpu or [1] * bs
        return ForwardBatch(
            mode=ForwardMode.DECODE, input_ids=self.input_ids[:bs], positions=self.positions[:bs],
            req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            extend_prefix_lens=self.seq_lens[:bs] - 1, extend_seq_lens=self.ones[:bs],
            out_cache_loc=self.out_cache_loc[:bs], req_to_token=self.req_to_token,
            seq_lens_cpu=seq_lens_cpu, extend_prefix_lens_cpu=[n - 1 for n in seq_lens_cpu],
            extend_seq_lens_cpu=[1] * bs, attn_backend=self.backend, cuda_graph=True)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):
            batch = self._batch(bs)
            self.backend.plan(batch)
            stream.wait_stream(torch.cuda.current_stream())  # plan may write device buffers
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up (triton autotune/JIT) outside the graph
                    self.model(batch)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = self.model(batch)
            pool = graph.pool()
            self.graphs[bs], self.outputs[bs] = graph, out
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.mode is ForwardMode.DECODE and batch.batch_size <= self.max_bs

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Decode hidden states ``[B, hidden]`` for ``batch`` through the padded graph."""
        bs = batch.batch_size
        padded = self.sizes[bisect.bisect_left(self.sizes, bs)]
        if padded > bs:
            self.input_ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
            self.req_pool_indices[bs:padded].zero_()
            self.seq_lens[bs:padded].fill_(1)
            self.out_cache_loc[bs:padded].zero_()
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.req_pool_indices[:bs].copy_(batch.req_pool_indices)
        self.seq_lens[:bs].copy_(batch.seq_lens)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc)
        self.backend.plan(self._batch(padded, list(batch.seq_lens_cpu) + [1] * (padded - bs)))
        self.graphs[padded].replay()
        return self.outputs[padded][:bs]
