"""KV store, RMSNorm (plain and fused with the residual add), rotary (alone and with the KV
store), SiLU-and-mul and the batch-1 GEMVs (plain and with the norm or SiLU-mul folded in)
vs torch or the separate kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from radixfleet.kernels.activation import silu_and_mul  # noqa: E402
from radixfleet.kernels.kv_store import store_kv  # noqa: E402
from radixfleet.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm  # noqa: E402
from radixfleet.kernels.rotary import (  # noqa: E402
    apply_rotary_,
    build_cos_sin_cache,
    rotary_store_kv_,
)

BF16 = torch.bfloat16


def _rand(*shape, dtype=BF16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).cuda()


@pytest.mark.parametrize("kv_heads,head_dim", [(8, 128), (3, 64), (1, 96)])
def test_store_kv_scatters_rows(kv_heads, head_dim):
    T, S = 37, 500
    # k and v as views of one fused qkv output (row stride larger than KVH * D).
    qkv = _rand(T, (4 + 2) * kv_heads * head_dim)
    k = qkv[:, 4 * kv_heads * head_dim:5 * kv_heads * head_dim].view(T, kv_heads, head_dim)
    v = qkv[:, 5 * kv_heads * head_dim:].view(T, kv_heads, head_dim)
    k_buf = torch.zeros(S, kv_heads, head_dim, dtype=BF16, device="cuda")
    v_buf = torch.zeros_like(k_buf)
    loc = torch.randperm(S - 1, device="cuda")[:T] + 1
    store_kv(k, v, k_buf, v_buf, loc)
    torch.testing.assert_close(k_buf[loc], k, atol=0, rtol=0)
    torch.testing.assert_close(v_buf[loc], v, atol=0, rtol=0)
    untouched = torch.ones(S, dtype=torch.bool, device="cuda")
    untouched[loc] = False
    assert k_buf[untouched].eq(0).all() and v_buf[untouched].eq(0).all()


def _rmsnorm_ref(x, w, eps):
    # transformers' LlamaRMSNorm: fp32 norm, cast back, times the weight.
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("T,N", [(1, 576), (33, 4096), (7, 5120), (300, 8192)])
def test_rmsnorm(T, N):
    x, w = _rand(T, N, seed=1), _rand(N, seed=2)
    torch.testing.assert_close(rmsnorm(x, w, 1e-5), _rmsnorm_ref(x, w, 1e-5), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("T,N", [(1, 576), (33, 4096), (300, 8192)])
def test_fused_add_rmsnorm(T, N):
    x, r, w = _rand(T, N, seed=3), _rand(T, N, seed=4), _rand(N, seed=5)
    normed, new_r = fused_add_rmsnorm(x, r, w, 1e-6)
    s = x + r
    torch.testing.assert_close(new_r, s, atol=0, rtol=0)
    torch.testing.assert_close(normed, _rmsnorm_ref(s, w, 1e-6), atol=2e-2, rtol=2e-2)
    assert x.equal(_rand(T, N, seed=3)) and r.equal(_rand(T, N, seed=4)), "inputs must not change"


def _rotary_ref(positions, x, cache):
    half = cache.shape[1] // 2
    cos, sin = cache[positions, :half][:, None], cache[positions, half:][:, None]
    xr, rest = x[..., :2 * half].float(), x[..., 2 * half:]
    x1, x2 = xr.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype), rest


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("H,KVH,D,rot,scaling", [
    (32, 8, 128, 128, LLAMA3), (9, 3, 64, 64, None), (12, 4, 128, 64, None), (40, 8, 128, 128, None)])
def test_rotary_in_place(H, KVH, D, rot, scaling):
    T = 65
    cache = build_cos_sin_cache(rot, 16384, 500000.0, scaling, device="cuda")
    positions = torch.randint(0, 16384, (T,), device="cuda")
    qkv = _rand(T, (H + 2 * KVH) * D, seed=6)
    q = qkv[:, :H * D].view(T, H, D)
    k = qkv[:, H * D:(H + KVH) * D].view(T, KVH, D)
    q_ref, q_rest = _rotary_ref(positions, q.clone(), cache)
    k_ref, k_rest = _rotary_ref(positions, k.clone(), cache)
    v_before = qkv[:, (H + KVH) * D:].clone()
    apply_rotary_(positions, q, k, cache)
    torch.testing.assert_close(q[..., :rot], q_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(k[..., :rot], k_ref, atol=2e-2, rtol=2e-2)
    assert q[..., rot:].equal(q_rest) and k[..., rot:].equal(k_rest)
    assert qkv[:, (H + KVH) * D:].equal(v_before), "v must not change"


@pytest.mark.parametrize("T,inter", [(1, 1536), (17, 14336), (256, 3000)])
def test_silu_and_mul(T, inter):
    x = _rand(T, 2 * inter, seed=7)
    gate, up = x.chunk(2, -1)
    torch.testing.assert_close(silu_and_mul(x), F.silu(gate) * up, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("N,K,bias", [(6144, 4096, False), (4096, 4096, True), (1000, 577, True), (3, 64, False),
                                    (300, 20000, True)])  # K > ROWS_MAX_K: the K-loop kernel
def test_gemv_matches_fp32_matmul(N, K, bias):
    from radixfleet.kernels.gemv import gemv

    x, w = _rand(1, K, seed=8), _rand(N, K, seed=9) * 0.05
    b = _rand(N, seed=10) if bias else None
    want = x.float() @ w.float().T + (b.float() if bias else 0)
    torch.testing.assert_close(gemv(x, w, b).float(), want, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("N,K,residual", [(6144, 4096, True), (28672, 4096, True), (1000, 577, False),
                                          (3, 64, True)])
def test_gemv_rmsnorm_matches_norm_then_matmul(N, K, residual):
    """``gemv_rmsnorm`` vs the fused add + RMSNorm kernel followed by an fp32 matmul: the
    new residual bit-identical, the output within bf16 rounding of the normalised row."""
    from radixfleet.kernels.gemv import gemv_rmsnorm

    h, r, nw = _rand(1, K, seed=11), _rand(1, K, seed=12), _rand(K, seed=13)
    w, b = _rand(N, K, seed=14) * 0.05, _rand(N, seed=15)
    if residual:
        normed, want_r = fused_add_rmsnorm(h, r, nw, 1e-5)
    else:
        normed, want_r = rmsnorm(h, nw, 1e-5), h
    y, new_r = gemv_rmsnorm(h, r if residual else None, nw, 1e-5, w, b)
    assert new_r.equal(want_r)
    torch.testing.assert_close(y.float(), normed.float() @ w.float().T + b.float(), atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("N,K", [(4096, 14336), (1000, 577), (7, 64)])
def test_gemv_silu_mul_matches_activation_then_matmul(N, K):
    from radixfleet.kernels.gemv import gemv_silu_mul

    gate_up, w = _rand(1, 2 * K, seed=16), _rand(N, K, seed=17) * 0.05
    want = silu_and_mul(gate_up).float() @ w.float().T
    torch.testing.assert_close(gemv_silu_mul(gate_up, w).float(), want, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("H,KVH,D,R", [(32, 8, 128, 128), (12, 4, 64, 64), (8, 2, 128, 64)])
def test_rotary_store_kv_equals_rotary_then_store(H, KVH, D, R):
    """One launch gives bit-identical q and cache rows to ``apply_rotary_`` + ``store_kv``,
    on views of a fused qkv row, with full and partial rotary (llama3 scaling)."""
    T, S = 19, 300
    cache = build_cos_sin_cache(R, 4096, 500000.0, {"rope_type": "llama3", "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192}, "cuda")
    qkv = _rand(T, (H + 2 * KVH) * D, seed=18)
    pos = torch.randint(0, 4096, (T,), generator=torch.Generator().manual_seed(19)).cuda()
    loc = torch.randperm(S - 1, generator=torch.Generator().manual_seed(20))[:T].cuda() + 1

    def views(t):
        return (x.view(T, -1, D) for x in t.split([H * D, KVH * D, KVH * D], -1))

    q1, k1, v1 = views(qkv.clone())
    kb1, vb1 = torch.zeros(S, KVH, D, dtype=BF16, device="cuda"), torch.zeros(S, KVH, D, dtype=BF16, device="cuda")
    apply_rotary_(pos, q1, k1, cache)
    store_kv(k1, v1, kb1, vb1, loc)
    q2, k2, v2 = views(qkv.clone())
    kb2, vb2 = torch.zeros_like(kb1), torch.zeros_like(vb1)
    rotary_store_kv_(pos, q2, k2, v2, cache, kb2, vb2, loc)
    assert q2.equal(q1) and kb2.equal(kb1) and vb2.equal(vb1)


@pytest.mark.parametrize("T,H,KVH,D", [(1, 32, 4, 128), (19, 16, 8, 128), (300, 12, 4, 64)])
def test_rotary_store_kv_with_qk_norms_equals_norm_kernel_then_rotary(T, H, KVH, D):
    """Qwen3's per-head q/k norms inside the rotary + KV-store launch give the q and cache rows
    of ``qk_rmsnorm`` then ``rotary_store_kv_`` (same roundings; the sum of squares may add up
    in another order, so within one bf16 step)."""
    from radixfleet.kernels.qk_norm import qk_rmsnorm

    S = 400
    cache = build_cos_sin_cache(D, 4096, 1000000.0, None, "cuda")
    qkv = _rand(T, (H + 2 * KVH) * D, seed=21) * 4
    wq, wk = _rand(D, seed=22), _rand(D, seed=23)
    pos = torch.randint(0, 4096, (T,), generator=torch.Generator().manual_seed(24)).cuda()
    loc = torch.randperm(S - 1, generator=torch.Generator().manual_seed(25))[:T].cuda() + 1

    def views(t):
        return (x.view(T, -1, D) for x in t.split([H * D, KVH * D, KVH * D], -1))

    q1, k1, v1 = views(qkv.clone())
    q1, k1 = qk_rmsnorm(q1, k1, wq, wk, 1e-6)
    kb1, vb1 = torch.zeros(S, KVH, D, dtype=BF16, device="cuda"), torch.zeros(S, KVH, D, dtype=BF16, device="cuda")
    rotary_store_kv_(pos, q1, k1, v1, cache, kb1, vb1, loc)
    q2, k2, v2 = views(qkv.clone())
    kb2, vb2 = torch.zeros_like(kb1), torch.zeros_like(vb1)
    rotary_store_kv_(pos, q2, k2, v2, cache, kb2, vb2, loc, qk_norm=(wq, wk, 1e-6))
    for ours, ref in ((q2, q1), (kb2[loc], kb1[loc])):
        torch.testing.assert_close(ours.float(), ref.float(), atol=0.02, rtol=0.01)
        assert ours.eq(ref).float().mean() > 0.99  # almost every element bit-identical
    assert vb2.equal(vb1)


@pytest.mark.parametrize("T,H,KVH,D", [(1, 32, 4, 128), (17, 16, 8, 128), (300, 40, 8, 128)])
def test_qk_rmsnorm_matches_two_rmsnorms(T, H, KVH, D):
    """Qwen3's per-head q and k norms in one launch, on views of the qkv output."""
    from radixfleet.kernels.qk_norm import qk_rmsnorm

    qkv = _rand(T, (H + 2 * KVH) * D, seed=7)
    q = qkv[:, :H * D].view(T, H, D)
    k = qkv[:, H * D:(H + KVH) * D].view(T, KVH, D)
    wq, wk = _rand(D, seed=8), _rand(D, seed=9)
    qo, ko = qk_rmsnorm(q, k, wq, wk, 1e-6)
    torch.testing.assert_close(qo, _rmsnorm_ref(q, wq, 1e-6), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ko, _rmsnorm_ref(k, wk, 1e-6), atol=2e-2, rtol=2e-2)
