"""The MoE layer on CPU: routing semantics, the TP split of the experts' intermediate
dimension (ranks' partial sums add up to the whole), the loader of transformers 5's stacked
expert tensors (its in-memory layout) against the per-expert checkpoint layout, and weight
updates of another expert layout refused up front."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_model

from radixfleet.engine.layers import distributed as dist
from radixfleet.engine.layers.moe import FusedMoE, moe_torch, select_experts


def test_renormalised_top_k_is_a_softmax_over_the_top_k_logits():
    """Mixtral's routing: softmax over the k largest logits (what renormalising gives)."""
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    weights, ids = select_experts(logits, 2, renormalize=True)
    torch.testing.assert_close(weights, torch.softmax(logits.gather(1, ids), -1))
    plain, same = select_experts(logits, 2, renormalize=False)
    assert torch.equal(same, ids) and (plain.sum(-1) < 1).all()


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_ranks_partial_sums_add_up_to_the_whole(monkeypatch, tp):
    E, k, H, inter, T = 6, 2, 16, 24, 9
    gen = torch.Generator().manual_seed(1)
    gate, up = torch.randn(E, inter, H, generator=gen), torch.randn(E, inter, H, generator=gen)
    down = torch.randn(E, H, inter, generator=gen)
    x, logits = torch.randn(T, H, generator=gen), torch.randn(T, E, generator=gen)

    def build(rank: int, size: int) -> FusedMoE:
        monkeypatch.setattr(dist, "_TP_RANK", rank)
        monkeypatch.setattr(dist, "_TP_SIZE", size)
        layer = FusedMoE(E, k, H, inter, renormalize=False)
        for e in range(E):
            layer.weight_loader(layer.w13, gate[e], (e, "gate"))
            layer.weight_loader(layer.w13, up[e], (e, "up"))
            layer.weight_loader(layer.w2, down[e], (e, "down"))
        return layer

    whole = build(0, 1)(x, logits)
    parts = sum(build(r, tp)(x, logits) for r in range(tp))
    torch.testing.assert_close(parts, whole, atol=1e-4, rtol=1e-4)
    weights, ids = select_experts(logits, k, False)
    torch.testing.assert_close(whole, moe_torch(x, torch.cat([gate, up], 1), down, weights, ids))
    with pytest.raises(ValueError, match="does not split"):
        build(0, 5)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_stacked_expert_tensors_load_like_per_expert_ones(tmp_path, arch):
    import transformers

    from radixfleet.engine.executor.model_runner import build_model, iter_safetensors
    from radixfleet.engine.models.model_config import ModelConfig
    from radixfleet.engine.models.registry import get_model_class

    folder = make_tiny_model(arch, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    stacked = dict(hf.state_dict())
    assert any(n.endswith("experts.gate_up_proj") for n in stacked), "transformers keeps experts stacked"
    cfg = ModelConfig.from_path(folder)
    models = [build_model(get_model_class(cfg.architecture), cfg, torch.device("cpu"), torch.float32)
              for _ in range(2)]
    models[0].load_weights(iter_safetensors(folder))  # per-expert names, as saved
    models[1].load_weights(stacked.items())
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_weights_of_another_expert_layout_are_refused_before_loading(tmp_path):
    from radixfleet.engine.executor.weight_update import incompatibility
    from radixfleet.engine.models.model_config import ModelConfig

    running = make_tiny_model("qwen3_moe", str(tmp_path / "a"))
    other = make_tiny_model("qwen3_moe", str(tmp_path / "b"), num_experts=4)
    assert incompatibility(ModelConfig.from_path(running), running) is None
    reason = incompatibility(ModelConfig.from_path(running), other)
    assert reason is not None and "experts=4" in reason and "same shape" in reason, reason


def test_fp8_expert_tensors_are_refused_with_a_reason(tmp_path):
    from radixfleet.engine.executor.model_runner import build_model
    from radixfleet.engine.models.model_config import ModelConfig
    from radixfleet.engine.models.moe import Qwen3MoeForCausalLM

    cfg = ModelConfig.from_path(make_tiny_model("qwen3_moe", str(tmp_path)))
    model = build_model(Qwen3MoeForCausalLM, cfg, torch.device("cpu"), torch.float32)
    scale = torch.ones(64, 1)
    with pytest.raises(ValueError, match="FP8 expert weights are not supported"):
        model.load_weights([("model.layers.0.mlp.experts.3.up_proj.weight_scale_inv", scale)])
