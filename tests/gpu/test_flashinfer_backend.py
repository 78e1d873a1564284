"""FlashInferBackend vs the plain-torch reference backend over whole ForwardBatches (bf16).

Extend over ragged batches with and without cached prefixes (chunked prefill), then decode;
GQA groups 1 and 3 (CUDA-core decode) and 4 and 8 (tensor-core decode); every layer's output
and the KV caches must match. Also: decode replayed from a captured CUDA graph as the
sequences grow, re-planned before every replay.

Run with ``-s`` to see the JIT cost: flashinfer compiles its kernels with nvcc on first use
(cache under $FLASHINFER_WORKSPACE_BASE, see conftest.py); each test prints its first step.
"""

from __future__ import annotations

import time

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("flashinfer", reason="needs flashinfer-python (pip install radixfleet[gpu])")

from _reference import ReferenceBackend, Step, check_decode_graph_replays, rel_err  # noqa: E402

from radixfleet.engine.attention.flashinfer_backend import FlashInferBackend  # noqa: E402
from radixfleet.engine.executor.forward_batch import ForwardMode  # noqa: E402
from radixfleet.engine.memory.kv_pool import KVPool  # noqa: E402

NUM_LAYERS = 2
D = 128  # one head dim keeps the JIT to two modules (decode, prefill) per dtype


def _backends(H, KVH, num_slots, dtype=torch.bfloat16):
    pools = [KVPool(NUM_LAYERS, num_slots, KVH, D, dtype, "cuda") for _ in range(2)]
    return (FlashInferBackend(pools[0], H, KVH, D, D ** -0.5),
            ReferenceBackend(pools[1], H, KVH, D, D ** -0.5))


def _run_step(backends, batch, H, KVH, gen, label=""):
    T = len(batch.out_cache_loc)
    dtype = backends[0].dtype
    qkv = [torch.randn(T, h, D, generator=gen).to(dtype).cuda() for h in (H, KVH, KVH)]
    outs = []
    for i, backend in enumerate(backends):
        t0 = time.perf_counter()
        backend.plan(batch)
        outs.append([backend.forward(*qkv, layer, batch) for layer in range(NUM_LAYERS)])
        if i == 0 and label:
            torch.cuda.synchronize()
            print(f"flashinfer {label}: plan + {NUM_LAYERS} layers {time.perf_counter() - t0:.2f}s")
    for layer, (got, want) in enumerate(zip(*outs, strict=True)):
        assert got.shape == (T, H, D) and got.dtype == dtype
        assert not got.isnan().any(), f"NaN in layer {layer} ({batch.mode})"
        err = rel_err(got, want)
        assert err < 1e-2, f"{batch.mode} layer {layer}: rel err {err:.2e}"


@pytest.mark.parametrize("H,KVH", [(32, 8), (32, 4), (12, 4), (8, 8)],
                         ids=["group4-tc", "group8-tc", "group3", "group1"])
def test_extend_then_decode_matches_reference(H, KVH):
    gen = torch.Generator().manual_seed(0)
    backends = _backends(H, KVH, num_slots=8000)
    assert backends[0].use_tensor_cores == (H // KVH >= 4)
    step = Step(8000, rows=[5, 2, 7], gen=gen)
    tag = f"H{H} KVH{KVH} D{D}"
    _run_step(backends, step.batch(ForwardMode.EXTEND, [700, 33, 1]), H, KVH, gen, f"extend {tag} (cold)")
    # Chunked prefill: the second chunk extends a cached prefix; ragged lengths.
    _run_step(backends, step.batch(ForwardMode.EXTEND, [1, 1500, 64]), H, KVH, gen, f"extend {tag}")
    _run_step(backends, step.batch(ForwardMode.DECODE, [1, 1, 1]), H, KVH, gen, f"decode {tag} (cold)")
    for _ in range(3):
        _run_step(backends, step.batch(ForwardMode.DECODE, [1, 1, 1]), H, KVH, gen, f"decode {tag}")
    for layer in range(NUM_LAYERS):
        assert backends[0].kv_pool.k_buffers[layer].equal(backends[1].kv_pool.k_buffers[layer])
        assert backends[0].kv_pool.v_buffers[layer].equal(backends[1].kv_pool.v_buffers[layer])


def test_decode_long_and_single_token_contexts():
    """Contexts of 1 token next to 4k-token ones (split-KV on some requests, not others)."""
    H, KVH = 32, 8
    gen = torch.Generator().manual_seed(2)
    backends = _backends(H, KVH, num_slots=12000)
    step = Step(12000, rows=[0, 1, 2, 3], gen=gen)
    _run_step(backends, step.batch(ForwardMode.EXTEND, [1, 4000, 2, 3000]), H, KVH, gen)
    _run_step(backends, step.batch(ForwardMode.DECODE, [1, 1, 1, 1]), H, KVH, gen)


def test_fp32_is_refused_with_a_reason():
    pool = KVPool(1, 16, 2, D, torch.float32, "cuda")
    with pytest.raises(ValueError, match="not torch.float32"):
        FlashInferBackend(pool, 4, 2, D, D ** -0.5)


@pytest.mark.parametrize("H,KVH", [(32, 8), (8, 8)], ids=["tensor-cores", "cuda-cores"])
def test_decode_cuda_graph_replay_as_sequences_grow(H, KVH):
    """Capture decode once (batch marked ``cuda_graph``); each replay is re-planned with the
    new host lengths and must match the reference."""
    gen = torch.Generator().manual_seed(1)
    backends = _backends(H, KVH, num_slots=8000)
    fi, ref = backends
    fi.reserve(max_batch_size=8)
    step = Step(8000, rows=[0, 1, 2, 3], gen=gen)
    _run_step(backends, step.batch(ForwardMode.EXTEND, [10, 200, 1, 999]), H, KVH, gen)

    check_decode_graph_replays(fi, ref, step, H, KVH, D, gen, replays=4)
