"""TritonAttentionBackend vs a plain-torch reference backend over whole ForwardBatches.

Two requests are prefilled in two chunks (the second chunk extends a cached prefix), then
decode several steps; every layer's output and the KV caches must match. Also: decode
replayed from a captured CUDA graph as sequences grow.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from _reference import attention_ref, rel_err  # noqa: E402

from radixfleet.engine.attention.base import (  # noqa: E402
    AttentionBackend,
    ForwardBatch,
    ForwardMode,
    KVPool,
)
from radixfleet.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402

NUM_LAYERS = 2


class ReferenceBackend(AttentionBackend):
    """Index-assign store, then per request a plain softmax over the gathered slots."""

    def forward(self, q, k, v, layer_id, batch):
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        k_buf[batch.out_cache_loc] = k
        v_buf[batch.out_cache_loc] = v
        out, start = [], 0
        for b, (n, prefix) in enumerate(zip(batch.extend_seq_lens_cpu, batch.extend_prefix_lens_cpu,
                                            strict=True)):
            slots = batch.req_to_token[batch.req_pool_indices[b], :prefix + n].long()
            out.append(attention_ref(q[start:start + n], k_buf, v_buf, slots, prefix, self.scale))
            start += n
        return torch.cat(out).to(q.dtype)


class Step:
    """Builds ForwardBatches over a shared req_to_token table and a slot free list."""

    def __init__(self, num_slots: int, rows: list[int], gen: torch.Generator):
        self.req_to_token = torch.zeros(8, 4096, dtype=torch.int32, device="cuda")
        self.free = (torch.randperm(num_slots - 1, generator=gen) + 1).tolist()
        self.rows = rows
        self.lens = [0] * len(rows)

    def batch(self, mode: ForwardMode, new: list[int]) -> ForwardBatch:
        locs, positions = [], []
        for b, n in enumerate(new):
            slots = [self.free.pop() for _ in range(n)]
            self.req_to_token[self.rows[b], self.lens[b]:self.lens[b] + n] = torch.tensor(slots, dtype=torch.int32)
            locs += slots
            positions += range(self.lens[b], self.lens[b] + n)
        prefix = list(self.lens)
        self.lens = [p + n for p, n in zip(prefix, new, strict=True)]
        i32 = dict(dtype=torch.int32, device="cuda")
        return ForwardBatch(
            mode=mode, input_ids=torch.zeros(len(locs), dtype=torch.int64, device="cuda"),
            positions=torch.tensor(positions, device="cuda"),
            req_pool_indices=torch.tensor(self.rows, device="cuda"),
            seq_lens=torch.tensor(self.lens, **i32), extend_prefix_lens=torch.tensor(prefix, **i32),
            extend_seq_lens=torch.tensor(new, **i32), out_cache_loc=torch.tensor(locs, device="cuda"),
            req_to_token=self.req_to_token, seq_lens_cpu=list(self.lens),
            extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=list(new))


def _backends(H, KVH, D, num_slots):
    pools = [KVPool(NUM_LAYERS, num_slots, KVH, D, torch.bfloat16, "cuda") for _ in range(2)]
    return (TritonAttentionBackend(pools[0], H, KVH, D, D ** -0.5),
            ReferenceBackend(pools[1], H, KVH, D, D ** -0.5))


def _run_step(backends, batch, H, KVH, D, gen):
    T = len(batch.out_cache_loc)
    qkv = [torch.randn(T, h, D, generator=gen).to(torch.bfloat16).cuda() for h in (H, KVH, KVH)]
    outs = []
    for backend in backends:
        backend.plan(batch)
        outs.append([backend.forward(*qkv, layer, batch) for layer in range(NUM_LAYERS)])
    for got, want in zip(*outs, strict=True):
        assert got.shape == (T, H, D) and got.dtype == torch.bfloat16
        assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("H,KVH,D", [(32, 8, 128), (9, 3, 64), (8, 8, 128)])
def test_extend_then_decode_matches_reference(H, KVH, D):
    gen = torch.Generator().manual_seed(0)
    backends = _backends(H, KVH, D, num_slots=6000)
    step = Step(6000, rows=[5, 2], gen=gen)
    _run_step(backends, step.batch(ForwardMode.EXTEND, [700, 33]), H, KVH, D, gen)
    _run_step(backends, step.batch(ForwardMode.EXTEND, [1, 1500]), H, KVH, D, gen)  # chunked prefill
    for _ in range(4):
        _run_step(backends, step.batch(ForwardMode.DECODE, [1, 1]), H, KVH, D, gen)
    for layer in range(NUM_LAYERS):
        assert backends[0].kv_pool.k_buffers[layer].equal(backends[1].kv_pool.k_buffers[layer])
        assert backends[0].kv_pool.v_buffers[layer].equal(backends[1].kv_pool.v_buffers[layer])


def test_decode_cuda_graph_replay_as_sequences_grow():
    """Capture decode once; replays with longer contexts match eager results."""
    H, KVH, D, bs = 32, 8, 128, 4
    gen = torch.Generator().manual_seed(1)
    backends = _backends(H, KVH, D, num_slots=8000)
    triton_backend, ref = backends
    triton_backend.reserve(max_batch_size=16)
    step = Step(8000, rows=[0, 1, 2, 3], gen=gen)
    _run_step(backends, step.batch(ForwardMode.EXTEND, [10, 200, 1, 999]), H, KVH, D, gen)

    batch = step.batch(ForwardMode.DECODE, [1] * bs)
    static = [torch.randn(bs, h, D, generator=gen).to(torch.bfloat16).cuda() for h in (H, KVH, KVH)]
    triton_backend.plan(batch)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) outside the capture
        triton_backend.forward(*static, 0, batch)
    torch.cuda.current_stream().wait_stream(stream)
    ref.plan(batch)
    ref.forward(*static, 0, batch)  # the same k/v the warm-up stored
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = triton_backend.forward(*static, 0, batch)

    for _ in range(3):
        nxt = step.batch(ForwardMode.DECODE, [1] * bs)
        for name in ("seq_lens", "out_cache_loc", "positions"):
            getattr(batch, name).copy_(getattr(nxt, name))
        for t in static:
            t.copy_(torch.randn(t.shape, generator=gen).to(torch.bfloat16))
        graph.replay()
        ref.plan(nxt)
        want = ref.forward(*static, 0, nxt)
        assert rel_err(graph_out, want) < 1e-2
