"""The triton kernels on CPU through triton's interpreter (TRITON_INTERPRET=1), small shapes, fp32.

The interpreter is chosen when a kernel is decorated, so each case runs in a fresh
subprocess with the variable set (this file run as a script). fp32 only: the interpreter
truncates fp32 → bf16 instead of rounding, so bf16 rounding is checked only on the GPU
(tests/gpu). References: tests/gpu/_reference.py.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

GPU_TESTS = Path(__file__).resolve().parents[1] / "gpu"


def case_decode() -> None:
    from _reference import attention_ref, make_paged_kv, rel_err

    from radixfleet.kernels.decode_attention import decode_attention

    gen = torch.Generator().manual_seed(0)
    for H, KVH, D in [(4, 4, 16), (6, 2, 32), (8, 1, 24), (8, 2, 64)]:
        lens = [1, 5, 70, 33]
        kv = make_paged_kv(lens, KVH, D, torch.float32, "cpu", gen)
        q = torch.randn(len(lens), H, D, generator=gen)
        ref = torch.cat([attention_ref(q[b:b + 1], kv.k_buf, kv.v_buf, kv.slots(b), n - 1, D ** -0.5)
                         for b, n in enumerate(lens)])
        semaphore = torch.zeros(len(lens) * KVH, dtype=torch.int32)
        for splits in (1, 3, 8, 8):  # the merge counters are reused (left zero) across calls
            out = decode_attention(q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_pool_indices,
                                   kv.seq_lens, D ** -0.5, num_kv_splits=splits, block_n=16,
                                   semaphore=semaphore)
            assert rel_err(out, ref) < 1e-5, (H, KVH, D, splits, rel_err(out, ref))
            assert not semaphore.any()


def case_extend() -> None:
    from _reference import attention_ref, make_paged_kv, rel_err

    from radixfleet.kernels.extend_attention import extend_attention

    gen = torch.Generator().manual_seed(1)
    prefix, ext = [0, 3, 40, 17], [5, 1, 30, 16]
    starts = torch.tensor([0, 5, 6, 36], dtype=torch.int32)
    for H, KVH, D in [(4, 4, 16), (6, 2, 32), (8, 1, 24)]:
        kv = make_paged_kv([p + e for p, e in zip(prefix, ext, strict=True)], KVH, D, torch.float32,
                           "cpu", gen)
        q = torch.randn(sum(ext), H, D, generator=gen)
        ref = torch.cat([attention_ref(q[int(s):int(s) + e], kv.k_buf, kv.v_buf, kv.slots(b), p,
                                       D ** -0.5)
                         for b, (s, p, e) in enumerate(zip(starts, prefix, ext, strict=True))])
        for config in (None, (32, 16, 4, 1)):
            out = extend_attention(q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_pool_indices,
                                   starts, torch.tensor(prefix, dtype=torch.int32),
                                   torch.tensor(ext, dtype=torch.int32), max(ext), D ** -0.5,
                                   config=config)
            assert rel_err(out, ref) < 1e-5, (H, KVH, D, config, rel_err(out, ref))


def case_small_kernels() -> None:
    import torch.nn.functional as F

    from radixfleet.kernels.activation import silu_and_mul
    from radixfleet.kernels.kv_store import store_kv
    from radixfleet.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
    from radixfleet.kernels.rotary import apply_rotary_, build_cos_sin_cache

    x, r, w = torch.randn(5, 96), torch.randn(5, 96), torch.randn(96)
    ref = w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rmsnorm(x, w), ref)
    normed, new_r = fused_add_rmsnorm(x, r, w)
    s = x + r
    torch.testing.assert_close(new_r, s)
    torch.testing.assert_close(normed, w * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))

    g = torch.randn(7, 2 * 40)
    torch.testing.assert_close(silu_and_mul(g), F.silu(g[:, :40]) * g[:, 40:])

    k, v = torch.randn(6, 3, 20), torch.randn(6, 3, 20)
    kb, vb = torch.zeros(30, 3, 20), torch.zeros(30, 3, 20)
    loc = torch.tensor([3, 9, 1, 29, 17, 4])
    store_kv(k, v, kb, vb, loc)
    assert kb[loc].equal(k) and vb[loc].equal(v) and int(kb.ne(0).flatten(1).any(1).sum()) == len(loc)

    cache = build_cos_sin_cache(16, 64, 10000.0)
    pos = torch.tensor([0, 5, 63])
    q, kk = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    cos, sin = cache[pos, :8][:, None], cache[pos, 8:][:, None]

    def rot(t):
        t1, t2 = t.chunk(2, -1)
        return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), -1)

    q_ref, k_ref = rot(q), rot(kk)
    apply_rotary_(pos, q, kk, cache)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(kk, k_ref)


def case_rotary_store_kv() -> None:
    """Rotary + KV store in one launch, on views of a fused qkv row as the model passes them,
    full and partial rotary (rotary dim < head dim: the rest is copied unrotated)."""
    from radixfleet.kernels.rotary import build_cos_sin_cache, rotary_store_kv_

    gen = torch.Generator().manual_seed(5)
    for H, KVH, D, R in [(4, 2, 16, 16), (6, 3, 24, 8)]:
        cache = build_cos_sin_cache(R, 64, 10000.0)
        pos, loc = torch.tensor([0, 7, 63, 2]), torch.tensor([5, 1, 19, 11])
        qkv = torch.randn(4, (H + 2 * KVH) * D, generator=gen)
        q, k, v = (t.view(4, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], -1))
        cos, sin = cache[pos, :R // 2][:, None], cache[pos, R // 2:][:, None]

        def rot(t, R=R, cos=cos, sin=sin):
            t1, t2, rest = t[..., :R // 2], t[..., R // 2:R], t[..., R:]
            return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin, rest), -1)

        q_ref, k_ref, v_ref, k_before = rot(q), rot(k), v.clone(), k.clone()
        kb, vb = torch.zeros(20, KVH, D), torch.zeros(20, KVH, D)
        rotary_store_kv_(pos, q, k, v, cache, kb, vb, loc)
        torch.testing.assert_close(q, q_ref)
        torch.testing.assert_close(kb[loc], k_ref)
        torch.testing.assert_close(vb[loc], v_ref)
        assert k.equal(k_before), "k itself is left as it was"
        assert int(kb.ne(0).flatten(1).any(1).sum()) == len(loc) == int(vb.ne(0).flatten(1).any(1).sum())
        if R == D:  # with Qwen3's per-head q/k norms in the same launch: the norm kernel, then this
            from radixfleet.kernels.qk_norm import qk_rmsnorm

            wq, wk = torch.randn(D, generator=gen), torch.randn(D, generator=gen)
            q, k, v = (t.view(4, -1, D) for t in qkv.clone().split([H * D, KVH * D, KVH * D], -1))
            q[:] = torch.randn(q.shape, generator=gen)  # fresh q; k and v as before
            qn, kn = qk_rmsnorm(q.clone(), k, wq, wk, 1e-6)
            kb2, vb2 = torch.zeros_like(kb), torch.zeros_like(vb)
            rotary_store_kv_(pos, q, k, v, cache, kb2, vb2, loc, qk_norm=(wq, wk, 1e-6))
            torch.testing.assert_close(q, rot(qn), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(kb2[loc], rot(kn), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(vb2[loc], v)


def case_kv_indices() -> None:
    """CSR flattening of req_to_token rows (the flashinfer backend's kv_indices)."""
    from radixfleet.kernels.kv_indices import build_kv_indices

    table = torch.randint(1, 1000, (6, 1100), dtype=torch.int32)
    rows, lens = torch.tensor([4, 0, 2]), [3, 1030, 0]
    indptr = torch.tensor([0, 3, 1033, 1033], dtype=torch.int32)
    out = torch.full((1040,), -1, dtype=torch.int32)
    build_kv_indices(table, rows, indptr, out)
    ref = torch.cat([table[r, :n] for r, n in zip(rows.tolist(), lens, strict=True)])
    assert out[:1033].equal(ref) and bool((out[1033:] == -1).all())


def case_backend() -> None:
    """Extend (with a cached prefix) then decode through TritonAttentionBackend vs the reference."""
    from _reference import attention_ref, rel_err

    from radixfleet.engine.attention.triton_backend import TritonAttentionBackend
    from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode
    from radixfleet.engine.memory.kv_pool import KVPool

    H, KVH, D = 4, 2, 16
    gen = torch.Generator().manual_seed(2)
    pool = KVPool(1, 200, KVH, D, torch.float32, "cpu")
    backend = TritonAttentionBackend(pool, H, KVH, D, D ** -0.5)
    req_to_token = torch.zeros(4, 64, dtype=torch.int32)
    free = (torch.randperm(199, generator=gen) + 1).tolist()
    rows, lens = [3, 1], [0, 0]
    for mode, new in [(ForwardMode.EXTEND, [9, 20]), (ForwardMode.EXTEND, [4, 1]),
                      (ForwardMode.DECODE, [1, 1]), (ForwardMode.DECODE, [1, 1])]:
        locs = []
        for b, n in enumerate(new):
            slots = [free.pop() for _ in range(n)]
            req_to_token[rows[b], lens[b]:lens[b] + n] = torch.tensor(slots, dtype=torch.int32)
            locs += slots
        prefix, lens = list(lens), [p + n for p, n in zip(lens, new, strict=True)]
        batch = ForwardBatch.from_host(mode, [0] * len(locs), rows, torch.tensor(locs), req_to_token,
                                       prefix, new)
        q, k, v = (torch.randn(len(locs), h, D, generator=gen) for h in (H, KVH, KVH))
        backend.plan(batch)
        out = backend.forward(q, k, v, 0, batch)
        assert pool.k_buffers[0][batch.out_cache_loc].equal(k)
        start, refs = 0, []
        for b, n in enumerate(new):
            slots = req_to_token[rows[b], :lens[b]].long()
            refs.append(attention_ref(q[start:start + n], pool.k_buffers[0], pool.v_buffers[0],
                                      slots, prefix[b], D ** -0.5))
            start += n
        assert rel_err(out, torch.cat(refs)) < 1e-5, (mode, rel_err(out, torch.cat(refs)))


def case_backend_reserved_scratch() -> None:
    """After ``reserve`` (what CUDA graphs were captured on), a decode batch larger than the
    reservation runs on scratch of its own: the reserved buffers, which captured graphs write,
    never move, and the output is still right."""
    from _reference import attention_ref, rel_err

    from radixfleet.engine.attention.triton_backend import TritonAttentionBackend
    from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode
    from radixfleet.engine.memory.kv_pool import KVPool

    H, KVH, D = 4, 2, 16
    gen = torch.Generator().manual_seed(3)
    pool = KVPool(1, 300, KVH, D, torch.float32, "cpu")
    backend = TritonAttentionBackend(pool, H, KVH, D, D ** -0.5)
    backend.reserve(2)
    reserved = [t.data_ptr() for t in (backend._mid_o, backend._mid_lse, backend._semaphore)]
    lens = [7, 30, 1, 12, 50]
    req_to_token = torch.zeros(len(lens), 64, dtype=torch.int32)
    slots = (torch.randperm(299, generator=gen) + 1)[:sum(lens)].to(torch.int32)
    for b, (start, n) in enumerate(zip([0, *itertools.accumulate(lens)], lens, strict=False)):
        req_to_token[b, :n] = slots[start:start + n]
    pool.k_buffers[0].copy_(torch.randn(pool.k_buffers[0].shape, generator=gen))
    pool.v_buffers[0].copy_(torch.randn(pool.v_buffers[0].shape, generator=gen))
    rows = list(range(len(lens)))
    new_locs = torch.tensor([int(req_to_token[b, n - 1]) for b, n in enumerate(lens)])
    batch = ForwardBatch.from_host(ForwardMode.DECODE, [0] * len(lens), rows, new_locs, req_to_token,
                                   [n - 1 for n in lens], [1] * len(lens))
    q, k, v = (torch.randn(len(lens), h, D, generator=gen) for h in (H, KVH, KVH))
    backend.plan(batch)
    out = backend.forward(q, k, v, 0, batch)
    assert [t.data_ptr() for t in (backend._mid_o, backend._mid_lse, backend._semaphore)] == reserved
    refs = [attention_ref(q[b:b + 1], pool.k_buffers[0], pool.v_buffers[0], req_to_token[b, :n].long(),
                          n - 1, D ** -0.5) for b, n in enumerate(lens)]
    assert rel_err(out, torch.cat(refs)) < 1e-5


def _gemv_variants():
    """Each GEMV kernel in turn: whole rows with one program per row block, whole rows with
    persistent programs, then the K loop (ROWS_MAX_K 0) with one autotune config (the
    interpreter would run every candidate)."""
    from radixfleet.kernels import gemv as mod

    loop_configs, saved = list(mod._CONFIGS), mod.ROWS_MAX_K
    try:
        for variant, override, limit in [("per_block", (2, 4, 0), saved), ("persistent", (1, 4, 8), saved),
                                         ("k_loop", None, 0)]:
            mod.ROWS_OVERRIDE, mod.ROWS_MAX_K = override, limit
            mod._CONFIGS[:] = loop_configs[:1]
            mod._gemv_kernel.cache.clear()
            yield variant
    finally:
        mod._CONFIGS[:], mod.ROWS_MAX_K, mod.ROWS_OVERRIDE = loop_configs, saved, None


def case_gemv() -> None:
    from radixfleet.kernels.gemv import gemv

    gen = torch.Generator().manual_seed(3)
    for variant in _gemv_variants():
        for n, k, bias in [(37, 600, True), (8, 512, False)]:
            x, w = torch.randn(1, k, generator=gen), torch.randn(n, k, generator=gen)
            b = torch.randn(n, generator=gen) if bias else None
            want = x @ w.T + (b if bias else 0)
            assert torch.allclose(gemv(x, w, b), want, atol=1e-4, rtol=1e-5), (variant, n, k)


def case_gemv_prologues() -> None:
    """The GEMV with the residual add + RMSNorm or the SiLU-mul folded in, against the
    separate ops (fp32), over K that is not a multiple of the tile."""
    import torch.nn.functional as F

    from radixfleet.kernels.gemv import gemv_rmsnorm, gemv_silu_mul

    gen = torch.Generator().manual_seed(4)
    for variant in _gemv_variants():
        for n, k in [(37, 600), (8, 512)]:
            h, r, nw = (torch.randn(1, k, generator=gen), torch.randn(1, k, generator=gen),
                        torch.randn(k, generator=gen))
            w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
            s = h + r
            normed = nw * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)
            y, new_r = gemv_rmsnorm(h, r, nw, 1e-5, w, b)
            torch.testing.assert_close(y, normed @ w.T + b, atol=1e-4, rtol=1e-4, msg=variant)
            torch.testing.assert_close(new_r, s)
            y, same = gemv_rmsnorm(h, None, nw, 1e-5, w)
            normed = nw * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
            torch.testing.assert_close(y, normed @ w.T, atol=1e-4, rtol=1e-4, msg=variant)
            assert same is h
            gu = torch.randn(1, 2 * k, generator=gen)
            want = (F.silu(gu[:, :k]) * gu[:, k:]) @ w.T
            torch.testing.assert_close(gemv_silu_mul(gu, w), want, atol=1e-4, rtol=1e-4, msg=variant)


def case_window_and_softcap() -> None:
    """Sliding windows (shorter and longer than tiles and contexts) and soft-capped logits."""
    from _reference import attention_ref, make_paged_kv, rel_err

    from radixfleet.kernels.decode_attention import decode_attention
    from radixfleet.kernels.extend_attention import extend_attention

    gen = torch.Generator().manual_seed(5)
    H, KVH, D = 6, 2, 32
    prefix, ext = [0, 3, 40, 17], [37, 1, 30, 16]
    starts = torch.tensor([0, 37, 38, 68], dtype=torch.int32)
    kv = make_paged_kv([p + e for p, e in zip(prefix, ext, strict=True)], KVH, D, torch.float32, "cpu", gen)
    q = torch.randn(sum(ext), H, D, generator=gen) * 3  # large logits: the cap bites
    lens = [p + e for p, e in zip(prefix, ext, strict=True)]
    # 50: masked tiles at the window's lower edge, unmasked ones inside it, masked diagonal.
    for window, cap in [(1, None), (5, None), (20, 2.0), (50, None), (200, None), (None, 2.0)]:
        ref = torch.cat([attention_ref(q[int(s):int(s) + e], kv.k_buf, kv.v_buf, kv.slots(b), p,
                                       D ** -0.5, window, cap)
                         for b, (s, p, e) in enumerate(zip(starts, prefix, ext, strict=True))])
        for config in (None, (32, 16, 4, 1)):
            out = extend_attention(q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_pool_indices,
                                   starts, torch.tensor(prefix, dtype=torch.int32),
                                   torch.tensor(ext, dtype=torch.int32), max(ext), D ** -0.5,
                                   config=config, window=window, logit_cap=cap)
            assert rel_err(out, ref) < 1e-5, ("extend", window, cap, config, rel_err(out, ref))
        qd = q[:len(lens)].contiguous()
        ref = torch.cat([attention_ref(qd[b:b + 1], kv.k_buf, kv.v_buf, kv.slots(b), n - 1, D ** -0.5,
                                       window, cap) for b, n in enumerate(lens)])
        for splits in (1, 3):
            out = decode_attention(qd, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_pool_indices,
                                   kv.seq_lens, D ** -0.5, num_kv_splits=splits, block_n=16,
                                   window=window, logit_cap=cap)
            assert rel_err(out, ref) < 1e-5, ("decode", window, cap, splits, rel_err(out, ref))


def case_qk_norm() -> None:
    """Per-head q and k RMSNorm in one launch, on views of a qkv buffer (rows strided)."""
    from radixfleet.kernels.qk_norm import qk_rmsnorm

    gen = torch.Generator().manual_seed(8)
    for T, H, KVH, D in [(1, 4, 2, 16), (5, 6, 1, 24), (3, 8, 8, 32)]:
        qkv = torch.randn(T, (H + 2 * KVH) * D + 3, generator=gen)  # row stride wider than q|k|v
        q = qkv[:, :H * D].view(T, H, D)
        k = qkv[:, H * D:(H + KVH) * D].view(T, KVH, D)
        wq, wk = torch.randn(D, generator=gen), torch.randn(D, generator=gen)
        qo, ko = qk_rmsnorm(q, k, wq, wk, 1e-6)

        def ref(x, w):
            return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

        torch.testing.assert_close(qo, ref(q, wq))
        torch.testing.assert_close(ko, ref(k, wk))
        assert qo.is_contiguous() and ko.is_contiguous()


def case_fused_moe() -> None:
    """Routing + align in one program, the torch align, and both grouped GEMMs, against a
    per-pair reference; experts with 0 tokens, k from 1 to 8."""
    from _moe_reference import SHAPES, moe_inputs, moe_ref, routing_ref
    from _reference import rel_err

    from radixfleet.kernels import fused_moe as fm
    from radixfleet.kernels import moe_gemv

    gen = torch.Generator().manual_seed(6)
    for T, E, k, H, inter in SHAPES:
        x, w13, w2, logits = moe_inputs(T, E, k, H, inter, torch.float32, "cpu", gen)
        for renorm in (False, True):
            want_w, want_ids = routing_ref(logits, k, renorm)
            w, ids, config, aligned = fm.route_and_align(logits, k, renorm, 2 * inter, H)
            assert torch.equal(ids.long(), want_ids), (T, E, k)
            torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-5)
            assert (aligned is None) == (T == 1)  # one token: no sorted layout (direct GEMMs)
            sorted_ids, expert_ids, num_post = aligned or fm.moe_align(ids, E, config[0])
            limit, fm.ALIGN_MAX_PAIRS = fm.ALIGN_MAX_PAIRS, 0  # the torch align, same layout
            try:
                again = fm.moe_align(ids.long(), E, config[0])
            finally:
                fm.ALIGN_MAX_PAIRS = limit
            n = int(num_post)
            assert n == int(again[2]) and n % config[0] == 0
            blocks = n // config[0]  # the same pairs in each block (their order within a block is free)
            assert torch.equal(sorted_ids[:n].view(blocks, -1).sort(1).values,
                               again[0][:n].view(blocks, -1).sort(1).values)
            assert torch.equal(expert_ids[:blocks], again[1][:blocks])
            assert sorted(sorted_ids[:n][sorted_ids[:n] < T * k].tolist()) == list(range(T * k))
            ref = moe_ref(x, w13, w2, w, ids)
            if T == 1:  # batch-1 decode: the first GEMM routes; or the two GEMVs
                out = fm.fused_moe_one_token(x, w13, w2, logits, k, renorm)
                assert rel_err(out, ref) < 1e-5, (T, E, k, rel_err(out, ref))
                for separately in (False, True):  # routing in the gate_up programs, or first
                    saved, moe_gemv.ROUTE_SEPARATELY = moe_gemv.ROUTE_SEPARATELY, separately
                    try:
                        out = moe_gemv.moe_one_token(x, w13, w2, logits, k, renorm)
                    finally:
                        moe_gemv.ROUTE_SEPARATELY = saved
                    assert rel_err(out, ref) < 1e-5, (T, E, k, separately, rel_err(out, ref))
            # the routing's block sizes with its layout; other ones (and a layout of their own) once
            for cfg in (config, (16, 32, 16, 2, 4, 1))[:1 + renorm]:
                out = fm.fused_moe(x, w13, w2, w, ids, cfg, aligned if cfg is config else None)
                assert rel_err(out, ref) < 1e-5, (T, E, k, cfg, rel_err(out, ref))


def case_fp8() -> None:
    """fp8 e4m3 KV cache and weights: the decode kernel over an fp8 cache with scales against
    the reference over the dequantized cache; the fp8 GEMV against the dequantized weight.
    Stores into an fp8 cache are checked on the GPU only (tests/gpu/test_fp8.py): the
    interpreter's fp32 -> e4m3 conversion is not the hardware's (1.995 becomes 1.0)."""
    from _reference import attention_ref, make_paged_kv, rel_err

    from radixfleet.engine.layers.fp8 import FP8, dequantize, quantize_rows
    from radixfleet.kernels.decode_attention import decode_attention
    from radixfleet.kernels.gemv import gemv

    gen = torch.Generator().manual_seed(5)
    lens, ks, vs = [1, 9, 40], 0.5, 4.0
    kv = make_paged_kv(lens, 2, 32, torch.float32, "cpu", gen)
    k8 = (kv.k_buf / ks).clamp(-448, 448).to(FP8)
    v8 = (kv.v_buf / vs).clamp(-448, 448).to(FP8)
    q = torch.randn(len(lens), 4, 32, generator=gen)
    out = decode_attention(q, k8, v8, kv.req_to_token, kv.req_pool_indices, kv.seq_lens, 32 ** -0.5,
                           num_kv_splits=2, block_n=16, k_scale=ks, v_scale=vs)
    ref = torch.cat([attention_ref(q[b:b + 1], k8.float() * ks, v8.float() * vs, kv.slots(b), n - 1,
                                   32 ** -0.5) for b, n in enumerate(lens)])
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    wq, ws = quantize_rows(torch.randn(37, 600, generator=gen))
    x = torch.randn(1, 600, generator=gen)
    torch.testing.assert_close(gemv(x, wq, w_scale=ws), x @ dequantize(wq, ws, torch.float32).T,
                               atol=1e-3, rtol=1e-4)


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_under_interpreter(case: str) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest (sets TRITON_INTERPRET=1)"
    sys.path.insert(0, str(GPU_TESTS))
    import torch

    CASES[sys.argv[1]]()
