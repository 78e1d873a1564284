"""The C CPU kernels (kernels/cpu_ops.c) against torch references."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from radixfleet.kernels import cpu_ops

pytestmark = pytest.mark.skipif(cpu_ops.load() is None, reason="no C compiler to build kernels/cpu_ops.c")


def _reference_decode(q, kv, table, rows, lens, scale):
    out = torch.empty_like(q)
    group = q.shape[1] // kv.shape[2]
    for b in range(q.shape[0]):
        slots = table[rows[b], :lens[b]].long()
        k = kv[slots, 0].repeat_interleave(group, 1).transpose(0, 1)  # [H, L, D]
        v = kv[slots, 1].repeat_interleave(group, 1).transpose(0, 1)
        out[b] = F.scaled_dot_product_attention(q[b][:, None], k, v, scale=scale)[:, 0]
    return out


@pytest.mark.parametrize("batch,heads,kv_heads,head_dim", [
    (1, 9, 3, 64), (3, 4, 4, 128), (16, 9, 3, 64), (5, 8, 1, 20), (7, 32, 8, 128), (12, 6, 2, 8)])
def test_decode_attention_matches_sdpa(batch, heads, kv_heads, head_dim):
    torch.manual_seed(batch * 100 + heads)
    slots, ctx = 3000, 257
    kv = torch.randn(slots, 2, kv_heads, head_dim) * 2
    table = torch.randint(1, slots, (batch + 4, ctx + 3), dtype=torch.int32)  # scattered slots
    rows = torch.randperm(batch + 4)[:batch]
    lens = torch.randint(1, ctx + 1, (batch,), dtype=torch.int32)
    lens[0] = 1  # a one-token context
    q = torch.randn(batch, heads, head_dim) * 2
    got = cpu_ops.decode_attention(q, kv, table, rows, lens, int(lens.max()), head_dim ** -0.5)
    want = _reference_decode(q, kv, table, rows, lens, head_dim ** -0.5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_decode_attention_extreme_scores():
    """Scores tens apart (softmax nearly one-hot) and very negative ones stay exact."""
    torch.manual_seed(1)
    kv = torch.randn(100, 2, 2, 64)
    table = torch.arange(100, dtype=torch.int32)[None].repeat(4, 1)
    q = torch.randn(4, 4, 64) * 30
    lens = torch.tensor([99, 50, 2, 77], dtype=torch.int32)
    rows = torch.arange(4)
    got = cpu_ops.decode_attention(q, kv, table, rows, lens, 99, 0.125)
    torch.testing.assert_close(got, _reference_decode(q, kv, table, rows, lens, 0.125), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 16, 100])
def test_rmsnorm_with_and_without_residual(rows):
    torch.manual_seed(rows)
    wide = torch.randn(rows, 600)
    x = wide[:, :576]  # strided rows, as a view of a wider output
    residual, w = torch.randn(rows, 576), torch.randn(576)
    torch.testing.assert_close(cpu_ops.rmsnorm(x, w, 1e-5), torch.rms_norm(x, (576,), w, 1e-5))
    normed, summed = cpu_ops.fused_add_rmsnorm(x, residual, w, 1e-6)
    torch.testing.assert_close(summed, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(normed, torch.rms_norm(x + residual, (576,), w, 1e-6))
    assert residual.data_ptr() != summed.data_ptr()  # inputs untouched


def test_rotary_in_place_on_fused_qkv_views():
    torch.manual_seed(0)
    t, h, kvh, d = 7, 9, 3, 64
    qkv = torch.randn(t, (h + 2 * kvh) * d)
    q, k = qkv[:, :h * d].view(t, h, d), qkv[:, h * d:(h + kvh) * d].view(t, kvh, d)
    v_before = qkv[:, (h + kvh) * d:].clone()
    positions = torch.tensor([0, 1, 5, 100, 2047, 3, 3])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(2048, dtype=torch.float64), inv_freq).float()
    cos, sin = freqs.cos()[positions][:, None], freqs.sin()[positions][:, None]

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    want_q, want_k = rotate(q.clone()), rotate(k.clone())
    cpu_ops.apply_rotary_(positions, q, k, torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous())
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
    assert torch.equal(qkv[:, (h + kvh) * d:], v_before)  # v is not touched


def test_silu_and_mul_over_the_whole_range():
    x = torch.cat([torch.randn(5, 2 * 1003) * 4, torch.linspace(-120, 120, 2 * 1003)[None]])
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_ops.silu_and_mul(x), F.silu(gate) * up, atol=1e-6, rtol=2e-6)


def test_only_fp32_and_bf16_cpu_tensors_use_the_kernels():
    assert cpu_ops.usable(torch.zeros(2))
    assert cpu_ops.usable(torch.zeros(2, dtype=torch.bfloat16))
    assert not cpu_ops.usable(torch.zeros(2, dtype=torch.float16))
    assert not cpu_ops.usable(torch.zeros(2, dtype=torch.float64))


# ---- bf16: bf16 storage, fp32 arithmetic. References: the fp32 computation on the same
# (bf16-rounded) inputs, rounded once to bf16 at the end, so the kernels may differ from them
# only by that last rounding (one bf16 ulp, 2^-8 relative) plus fp32 noise.
BF16_TOL = {"atol": 1e-2, "rtol": 8e-3}


def _bf16(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).bfloat16()


@pytest.mark.parametrize("batch,heads,kv_heads,head_dim", [(1, 9, 3, 64), (16, 9, 3, 64), (5, 8, 1, 20)])
def test_decode_attention_bf16(batch, heads, kv_heads, head_dim):
    torch.manual_seed(batch)
    slots, ctx = 2000, 200
    kv = _bf16(slots, 2, kv_heads, head_dim, scale=2)
    table = torch.randint(1, slots, (batch + 2, ctx), dtype=torch.int32)
    rows = torch.randperm(batch + 2)[:batch]
    lens = torch.randint(1, ctx + 1, (batch,), dtype=torch.int32)
    q = _bf16(batch, heads, head_dim, scale=2)
    got = cpu_ops.decode_attention(q, kv, table, rows, lens, int(lens.max()), head_dim ** -0.5)
    assert got.dtype == torch.bfloat16
    want = _reference_decode(q.float(), kv.float(), table, rows, lens, head_dim ** -0.5)
    torch.testing.assert_close(got.float(), want.bfloat16().float(), **BF16_TOL)


def test_rmsnorm_bf16_rounds_the_residual_sum_as_a_bf16_model_does():
    torch.manual_seed(3)
    wide = _bf16(16, 600)
    x, residual, w = wide[:, :576], _bf16(16, 576), _bf16(576)
    normed = cpu_ops.rmsnorm(x, w, 1e-5)
    torch.testing.assert_close(normed, torch.rms_norm(x.float(), (576,), w.float(), 1e-5).bfloat16(),
                               **BF16_TOL)
    normed, summed = cpu_ops.fused_add_rmsnorm(x, residual, w, 1e-6)
    assert summed.dtype == normed.dtype == torch.bfloat16
    assert torch.equal(summed, x + residual)  # torch's bf16 add: fp32 sum rounded to nearest even
    torch.testing.assert_close(normed, torch.rms_norm(summed.float(), (576,), w.float(), 1e-6).bfloat16(),
                               **BF16_TOL)


def test_rotary_bf16_in_place():
    torch.manual_seed(0)
    t, h, kvh, d = 5, 9, 3, 64
    qkv = _bf16(t, (h + 2 * kvh) * d)
    q, k = qkv[:, :h * d].view(t, h, d), qkv[:, h * d:(h + kvh) * d].view(t, kvh, d)
    positions = torch.tensor([0, 1, 7, 300, 1023])
    freqs = torch.outer(torch.arange(1024, dtype=torch.float32), 1.0 / (1e5 ** (torch.arange(0, d, 2) / d)))
    cos, sin = freqs.cos()[positions][:, None], freqs.sin()[positions][:, None]

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).bfloat16()

    want_q, want_k = rotate(q), rotate(k)
    cpu_ops.apply_rotary_(positions, q, k, torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous())
    torch.testing.assert_close(q, want_q, **BF16_TOL)
    torch.testing.assert_close(k, want_k, **BF16_TOL)


def test_silu_and_mul_bf16():
    x = torch.cat([torch.randn(5, 2 * 1003) * 4, torch.linspace(-120, 120, 2 * 1003)[None]]).bfloat16()
    gate, up = x.float().chunk(2, dim=-1)
    got = cpu_ops.silu_and_mul(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, (F.silu(gate) * up).bfloat16(), **BF16_TOL)


def test_missing_compiler_falls_back_to_torch(tmp_path):
    """No compiler (and nothing built yet): ``load`` returns None with a warning, no crash."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "CC": str(tmp_path / "no-such-cc")}
    code = "from radixfleet.kernels import cpu_ops; print(cpu_ops.load())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    assert "CPU kernels unavailable" in done.stderr


def test_switched_off_by_environment(tmp_path):
    env = {**os.environ, "RADIXFLEET_CPU_KERNELS": "0"}
    code = "from radixfleet.kernels import cpu_ops; print(cpu_ops.load())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "None", done.stderr
