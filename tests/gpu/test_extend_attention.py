"""Extend attention kernel vs a plain-torch causal softmax over gathered slots (bf16: rel err < 1e-2)."""

from __future__ import annotations

import zlib

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from _reference import attention_ref, make_paged_kv, rel_err  # noqa: E402

from radixfleet.kernels.extend_attention import extend_attention  # noqa: E402

HEADS = [(8, 8), (12, 4), (32, 8), (32, 4)]  # GQA ratios 1, 3, 4, 8
# (prefix_lens, extend_lens) per request.
BATCHES = {
    "one_prompt": ([0], [1000]),
    "long_prompts": ([0, 100], [1500, 1100]),  # > 1024 new tokens: the 128-row default tiles
    "one_token": ([0], [1]),
    "ragged": ([0, 5, 2000, 127, 0, 64], [17, 1, 300, 129, 128, 63]),
    "long_prefix": ([1999, 2000], [50, 200]),
}


def _run(heads, head_dim, prefix, ext, dtype=torch.bfloat16, seed=0, config=None):
    H, KVH = heads
    gen = torch.Generator().manual_seed(seed)
    kv = make_paged_kv([p + e for p, e in zip(prefix, ext, strict=True)], KVH, head_dim, dtype, "cuda", gen)
    T = sum(ext)
    q = torch.randn(T, H, head_dim, generator=gen).to(dtype).cuda()
    starts = [sum(ext[:b]) for b in range(len(ext))]
    i32 = dict(dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    extend_attention(q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_pool_indices,
                     torch.tensor(starts, **i32), torch.tensor(prefix, **i32),
                     torch.tensor(ext, **i32), max(ext), head_dim ** -0.5, out=out, config=config)
    ref = torch.cat([attention_ref(q[s:s + e], kv.k_buf, kv.v_buf, kv.slots(b), p, head_dim ** -0.5)
                     for b, (s, p, e) in enumerate(zip(starts, prefix, ext, strict=True))])
    assert not out.isnan().any()
    return out, ref


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch", list(BATCHES), ids=str)
def test_extend_matches_reference(heads, head_dim, batch):
    prefix, ext = BATCHES[batch]
    out, ref = _run(heads, head_dim, prefix, ext, seed=zlib.crc32(repr((heads, head_dim, batch)).encode()))
    assert rel_err(out, ref) < 1e-2
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize("config", [(64, 64, 4, 2), (128, 64, 4, 3), (128, 32, 4, 2), (128, 128, 8, 2), (64, 16, 4, 1)])
def test_extend_block_configs(config):
    """Every tile shape the benchmark sweeps is correct too."""
    out, ref = _run((32, 8), 128, [0, 300, 33], [257, 64, 190], config=config)
    assert rel_err(out, ref) < 1e-2


def test_extend_fp16_odd_head_dim():
    out, ref = _run((6, 2), 96, [10, 0], [40, 70], dtype=torch.float16)
    assert rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_extend_fp32_is_ieee_accurate(head_dim):
    """fp32: ieee dots (tf32 gives rel err ~1e-3) and tiles that fit shared memory."""
    out, ref = _run((16, 4), head_dim, [0, 300, 17], [200, 64, 1100], dtype=torch.float32)
    err = rel_err(out, ref)
    assert err < 1e-5, f"fp32 extend rel err {err:.2e}"
