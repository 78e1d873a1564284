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

from _reference import ReferenceBackend, Step, check_decode_graph_replays, rel_err  # noqa: E402

from radixfleet.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from radixfleet.engine.executor.forward_batch import ForwardMode  # noqa: E402
from radixfleet.engine.memory.kv_pool import KVPool  # noqa: E402

NUM_LAYERS = 2


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
    """Capture decode once; replays with longer contexts (re-planned before each, as the
    engine does) match eager results."""
    H, KVH, D = 32, 8, 128
    gen = torch.Generator().manual_seed(1)
    backends = _backends(H, KVH, D, num_slots=8000)
    triton_backend, ref = backends
    triton_backend.reserve(max_batch_size=16)
    step = Step(8000, rows=[0, 1, 2, 3], gen=gen)
    _run_step(backends, step.batch(ForwardMode.EXTEND, [10, 200, 1, 999]), H, KVH, D, gen)

    check_decode_graph_replays(triton_backend, ref, step, H, KVH, D, gen, replays=3)
