"""Decode attention kernel vs a plain-torch softmax over gathered slots (bf16: rel err < 1e-2)."""

from __future__ import annotations

import zlib

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from _reference import attention_ref, make_paged_kv, rel_err  # noqa: E402

from radixfleet.kernels.decode_attention import decode_attention  # noqa: E402

# (num_heads, num_kv_heads): GQA ratios 1, 3, 4, 8.
HEADS = [(8, 8), (12, 4), (32, 8), (32, 4)]
LENS = {
    "single": [1],
    "ragged": [1, 2, 63, 64, 65, 300, 2001, 17],
    "long": [4096, 1500],
}


def _decode_ref(q, kv, scale):
    return torch.cat([attention_ref(q[b:b + 1], kv.k_buf, kv.v_buf, kv.slots(b),
                                    int(kv.seq_lens[b]) - 1, scale) for b in range(q.shape[0])])


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("lens", list(LENS), ids=str)
def test_decode_matches_reference(heads, head_dim, lens):
    H, KVH = heads
    gen = torch.Generator().manual_seed(zlib.crc32(repr((H, KVH, head_dim, lens)).encode()))
    kv = make_paged_kv(LENS[lens], KVH, head_dim, torch.bfloat16, "cuda", gen)
    q = torch.randn(len(LENS[lens]), H, head_dim, generator=gen).to(torch.bfloat16).cuda()
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    decode_attention(q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_pool_indices, kv.seq_lens,
                     scale, out=out)
    ref = _decode_ref(q, kv, scale)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-2
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize("splits", [1, 2, 7, 32])
def test_decode_any_split_count(splits):
    """Split counts larger than the number of tiles leave empty chunks; they must get zero weight.

    Regression: an empty chunk (start past seq_len) once computed a negative tile count whose
    floor division reached back into the previous chunk's keys, counting them twice.
    """
    gen = torch.Generator().manual_seed(splits)
    lens = [1, 5, 130, 1000]
    kv = make_paged_kv(lens, 8, 128, torch.bfloat16, "cuda", gen)
    q = torch.randn(len(lens), 32, 128, generator=gen).to(torch.bfloat16).cuda()
    out = decode_attention(q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_pool_indices,
                           kv.seq_lens, 128 ** -0.5, num_kv_splits=splits)
    ref = _decode_ref(q, kv, 128 ** -0.5)
    assert rel_err(out, ref) < 1e-2


def test_decode_fp16_and_odd_head_dim():
    gen = torch.Generator().manual_seed(3)
    lens = [77, 3, 900]
    kv = make_paged_kv(lens, 2, 96, torch.float16, "cuda", gen)
    q = torch.randn(len(lens), 6, 96, generator=gen).to(torch.float16).cuda()
    out = decode_attention(q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_pool_indices,
                           kv.seq_lens, 96 ** -0.5)
    assert rel_err(out, _decode_ref(q, kv, 96 ** -0.5)) < 5e-3


def test_decode_non_contiguous_q():
    """q as a view of a fused qkv projection output (row stride larger than H * D)."""
    gen = torch.Generator().manual_seed(4)
    lens = [10, 500]
    kv = make_paged_kv(lens, 8, 128, torch.bfloat16, "cuda", gen)
    qkv = torch.randn(2, (32 + 16) * 128, generator=gen).to(torch.bfloat16).cuda()
    q = qkv[:, :32 * 128].view(2, 32, 128)
    out = decode_attention(q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_pool_indices,
                           kv.seq_lens, 128 ** -0.5)
    assert rel_err(out, _decode_ref(q, kv, 128 ** -0.5)) < 1e-2


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_decode_fp32_is_ieee_accurate(head_dim):
    """fp32 caches: the dots run in ieee fp32, not tf32 (tf32 gives rel err ~1e-3)."""
    gen = torch.Generator().manual_seed(5)
    lens = [1, 64, 700, 3000]
    kv = make_paged_kv(lens, 4, head_dim, torch.float32, "cuda", gen)
    q = torch.randn(len(lens), 16, head_dim, generator=gen).cuda()
    out = decode_attention(q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_pool_indices,
                           kv.seq_lens, head_dim ** -0.5)
    err = rel_err(out, _decode_ref(q, kv, head_dim ** -0.5))
    assert err < 1e-5, f"fp32 decode rel err {err:.2e}"


def test_one_launch_merge_is_race_free_and_graph_safe():
    """The last program of each (request, kv head) merges the chunks through an atomic
    counter. 200 launches at batch 1 with 32 chunks (the batch-1 decode setting), eager and
    replayed from a CUDA graph, reusing one counter buffer: every output bit-identical to
    the first (the merge order is fixed) and within tolerance of the reference, and the
    counters back at zero."""
    gen = torch.Generator().manual_seed(21)
    kv = make_paged_kv([3000], 8, 128, torch.bfloat16, "cuda", gen)
    q = torch.randn(1, 32, 128, generator=gen).to(torch.bfloat16).cuda()
    sem = torch.zeros(8, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def run():
        decode_attention(q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_pool_indices, kv.seq_lens,
                         128 ** -0.5, num_kv_splits=32, out=out, semaphore=sem)

    run()
    first = out.clone()
    assert rel_err(first, _decode_ref(q, kv, 128 ** -0.5)) < 1e-2
    for _ in range(100):
        out.zero_()
        run()
        assert out.equal(first)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()  # warm-up on the capture stream
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(100):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert out.equal(first)
    assert not sem.any()
