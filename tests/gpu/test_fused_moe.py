"""The fused MoE kernels (``kernels/fused_moe.py``) against a per-pair fp32 reference
(``_moe_reference.py``): several expert counts, top-k 1-8, token counts from 1 to past the
single-program align limit, experts that receive 0 tokens; the routing in the align kernel
and in the one-token GEMM against torch's softmax/top-k; the engine's MoE layer captured in
a CUDA graph (1, 4, 64 tokens) and replayed with other routing; and that layer on CUDA
against its torch path.

Tolerances: bf16/fp16 relative error (Frobenius) < 2e-2 (each expert output is rounded to
the model dtype before the weighted sum, as transformers does); fp32 < 1e-5 (ieee dots).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from _moe_reference import SHAPES, moe_inputs, moe_ref, routing_ref  # noqa: E402
from _reference import rel_err  # noqa: E402

from radixfleet.kernels import fused_moe as fm  # noqa: E402
from radixfleet.kernels import moe_gemv  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
# Adds Qwen3-30B-A3B's expert shape (128 experts of 768, top 8, hidden 2048) at decode and
# prefill sizes, Mixtral-like (8 of 1792, top 2), and more pairs than ALIGN_MAX_PAIRS.
BIG = [(1, 128, 8, 2048, 768), (16, 128, 8, 2048, 768), (700, 128, 8, 2048, 768),
       (5, 8, 2, 1024, 1792), (3000, 8, 2, 256, 128)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + BIG, ids=str)
def test_fused_moe_matches_reference(shape, dtype):
    T, E, k, H, inter = shape
    gen = torch.Generator().manual_seed(T * 131 + E)
    x, w13, w2, logits = moe_inputs(T, E, k, H, inter, dtype, "cuda", gen)
    weights, ids = routing_ref(logits, k, renormalize=True)
    ref = moe_ref(x, w13, w2, weights, ids) if T * k <= 4096 else None
    out = fm.fused_moe(x, w13, w2, weights, ids)
    if ref is None:  # large: compare with the engine's torch path instead (fp32 reference too slow)
        from radixfleet.engine.layers.moe import moe_torch

        ref = moe_torch(x.float(), w13.float(), w2.float(), weights, ids)
    err = rel_err(out, ref)
    print(f"{torch.cuda.get_device_name()} {shape} {dtype}: relative error {err:.2e}")
    assert out.dtype == dtype and out.shape == (T, H)
    assert err < TOL[dtype], err


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shape", SHAPES + BIG[:2], ids=str)
def test_routing_in_the_align_kernel_matches_torch(shape, renormalize):
    T, E, k, H, inter = shape
    gen = torch.Generator().manual_seed(7)
    x, w13, w2, logits = moe_inputs(T, E, k, H, inter, torch.bfloat16, "cuda", gen, torch.float32)
    want_w, want_ids = routing_ref(logits, k, renormalize)
    weights, ids, config, aligned = fm.route_and_align(logits, k, renormalize, 2 * inter, H)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(weights, want_w, atol=1e-5, rtol=1e-4)
    assert (aligned is None) == (T == 1)  # one token: the GEMMs take its experts directly
    sorted_ids, expert_ids, num_post = aligned or fm.moe_align(ids, E, config[0])
    n = int(num_post)
    pairs = sorted_ids[:n]
    assert sorted(pairs[pairs < T * k].tolist()) == list(range(T * k))  # each pair once
    blocks = expert_ids[:n // config[0]].long()
    owner = blocks.repeat_interleave(config[0])  # the expert of each sorted row
    real = pairs < T * k
    assert torch.equal(owner[real], ids.reshape(-1).long()[pairs[real].long()])
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
    assert (counts == 0).any()  # some experts receive no tokens
    out = fm.fused_moe(x, w13, w2, weights, ids, config, aligned)
    assert rel_err(out, moe_ref(x, w13, w2, weights, ids)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("impl", ["gemm", "gemv", "gemv_routed_first"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shape", [s for s in SHAPES + BIG if s[0] == 1] + [(1, 8, 2, 4096, 14336)], ids=str)
def test_one_token_routed_inside_the_kernels_matches_reference(shape, renormalize, impl, monkeypatch):
    """Batch-1 decode: the GEMM that routes inside, and the two GEMVs (``kernels/moe_gemv.py``;
    also Mixtral 8x7B's expert shape)."""
    T, E, k, H, inter = shape
    gen = torch.Generator().manual_seed(5)
    x, w13, w2, logits = moe_inputs(T, E, k, H, inter, torch.bfloat16, "cuda", gen, torch.float32)
    weights, ids = routing_ref(logits, k, renormalize)
    one_token = fm.fused_moe_one_token if impl == "gemm" else moe_gemv.moe_one_token
    monkeypatch.setattr(moe_gemv, "ROUTE_SEPARATELY", impl == "gemv_routed_first")
    out = one_token(x, w13, w2, logits, k, renormalize)
    assert rel_err(out, moe_ref(x, w13, w2, weights, ids)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("T", [1, 4, 64])
def test_decode_step_replays_in_a_cuda_graph_with_new_routing(T):
    """The engine's MoE layer (routing, layout and both GEMMs) captured once; replays with
    other inputs match eager exactly (no host sync inside: capture would fail)."""
    from radixfleet.engine.layers.moe import FusedMoE

    E, k, H, inter = 64, 8, 512, 256
    gen = torch.Generator().manual_seed(3)
    x, w13, w2, logits = moe_inputs(T, E, k, H, inter, torch.bfloat16, "cuda", gen)
    with torch.device("cuda"):
        layer = FusedMoE(E, k, H, inter, renormalize=True).to(torch.bfloat16)
    layer.w13.data.copy_(w13)
    layer.w2.data.copy_(w2)
    layer(x, logits)  # compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x, logits)
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        new_x, _, _, new_logits = moe_inputs(T, E, k, H, inter, torch.bfloat16, "cuda", g)
        x.copy_(new_x)
        logits.copy_(new_logits)
        graph.replay()
        torch.testing.assert_close(out, layer(x, logits), atol=0, rtol=0)


@pytest.mark.parametrize("renormalize", [False, True])
def test_moe_layer_on_cuda_matches_its_torch_path(renormalize):
    from radixfleet.engine.layers.moe import FusedMoE, moe_torch, select_experts

    E, k, H, inter = 16, 4, 256, 128
    with torch.device("cuda"):
        layer = FusedMoE(E, k, H, inter, renormalize).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(11)
    for T in (1, 9, 300):
        x, w13, w2, logits = moe_inputs(T, E, k, H, inter, torch.bfloat16, "cuda", gen, torch.float32)
        layer.w13.data.copy_(w13)
        layer.w2.data.copy_(w2)
        weights, ids = select_experts(logits, k, renormalize)
        ref = moe_torch(x.float(), w13.float(), w2.float(), weights, ids)
        assert rel_err(layer(x, logits), ref) < TOL[torch.bfloat16]
