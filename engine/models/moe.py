"""Mixture-of-experts decoders: Qwen2-MoE, Qwen3-MoE and Mixtral.

Attention, norms, embeddings and the LM head are the Llama family's (``llama.py``; Qwen2-MoE
has q/k/v bias, Qwen3-MoE per-head q/k norms). The MLP of a sparse layer is a router over
``E`` SwiGLU experts (``engine/layers/moe.py``), plus for Qwen2-MoE a shared expert whose
output is scaled by ``sigmoid(shared_expert_gate(x))``. The families differ in switches
read from the config:

- routing: softmax over all experts, top-k, renormalised (Mixtral always; Qwen when
  ``norm_topk_prob``);
- Qwen layers listed in ``mlp_only_layers``, or off the ``decoder_sparse_step``, keep a
  dense MLP of ``intermediate_size``.

Checkpoint layouts read: Mixtral's ``block_sparse_moe.experts.N.w1/w2/w3`` (gate, down,
up), Qwen's ``mlp.experts.N.gate_proj/up_proj/down_proj``, ``shared_expert.*``,
``shared_expert_gate``, and transformers 5's stacked ``mlp.experts.gate_up_proj``
``[E, 2I, H]`` / ``mlp.experts.down_proj`` ``[E, H, I]``.
"""

from __future__ import annotations

import functools
import logging
import re

import torch
import torch.nn.functional as F
from torch import nn

from radixfleet.engine.executor.forward_batch import ForwardBatch
from radixfleet.engine.layers import distributed as dist
from radixfleet.engine.layers import fp8
from radixfleet.engine.layers.activation import SiluAndMul
from radixfleet.engine.layers.linear import MergedColumnParallelLinear, RowParallelLinear, matmul
from radixfleet.engine.layers.moe import FusedMoE
from radixfleet.engine.layers.norm import RMSNorm
from radixfleet.engine.models.llama import MLP, Attention, LlamaForCausalLM
from radixfleet.engine.models.model_config import ModelConfig

logger = logging.getLogger(__name__)


@functools.cache
def _warn_experts_unquantized() -> None:
    logger.warning("quantization='fp8': the MoE experts keep the model dtype (fp8 experts are not "
                   "implemented); attention and dense layers are fp8")


def moe_settings(cfg: ModelConfig) -> dict:
    """The MoE fields of ``cfg.hf`` under one set of names (Qwen3-MoE's config.json may spell
    the expert count ``num_experts`` or ``num_local_experts``)."""
    hf = cfg.hf
    mixtral = hf.get("model_type") == "mixtral"
    return {
        "num_experts": hf.get("num_experts") or hf["num_local_experts"],
        "top_k": hf["num_experts_per_tok"],
        "intermediate": hf.get("moe_intermediate_size") or cfg.intermediate_size,
        "renormalize": True if mixtral else bool(hf.get("norm_topk_prob", False)),
        "shared_intermediate": hf.get("shared_expert_intermediate_size") or 0,
        "sparse_step": hf.get("decoder_sparse_step") or 1,
        "mlp_only_layers": tuple(hf.get("mlp_only_layers") or ()),
    }


def is_sparse_layer(cfg: ModelConfig, layer_id: int) -> bool:
    s = moe_settings(cfg)
    return layer_id not in s["mlp_only_layers"] and (layer_id + 1) % s["sparse_step"] == 0


class SharedExpert(nn.Module):
    """Qwen2-MoE's always-on expert; ``partial`` leaves the TP reduction to the caller."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate], bias=False)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=False)
        self.act = SiluAndMul()

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        d = self.down_proj
        return matmul(self.act(self.gate_up_proj(x)), d.weight, None, d.packed)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        s = moe_settings(cfg)
        # Router weights are replicated on every rank; no oneDNN prepacking on CPU, so that fp32
        # logits (and near-ties between experts) are transformers' own.
        self.gate = nn.Linear(cfg.hidden_size, s["num_experts"], bias=False)
        self.gate.weight.requires_grad_(False)
        self.experts = FusedMoE(s["num_experts"], s["top_k"], cfg.hidden_size, s["intermediate"],
                                s["renormalize"])
        if fp8.building_fp8():
            _warn_experts_unquantized()
        self.shared_expert = self.shared_expert_gate = None
        if s["shared_intermediate"]:
            self.shared_expert = SharedExpert(cfg.hidden_size, s["shared_intermediate"])
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
            self.shared_expert_gate.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [T, H] (normed) → [T, H], reduced over the TP ranks once."""
        out = self.experts(x, matmul(x, self.gate.weight, None, None))  # batch 1 on CUDA: kernels/gemv.py
        if self.shared_expert is not None:
            scale = torch.sigmoid(F.linear(x, self.shared_expert_gate.weight))  # [T, 1], same on every rank
            out = out + scale * self.shared_expert.partial(x)
        return dist.all_reduce(out)


class MoeDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, qk_norm: bool):
        super().__init__()
        self.self_attn = Attention(cfg, layer_id, qk_norm)
        self.mlp = SparseMoeBlock(cfg) if is_sparse_layer(cfg, layer_id) else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, batch: ForwardBatch):
        qkv, residual = self.self_attn.qkv_proj.forward_normed(self.input_layernorm, x, residual)
        x = self.self_attn(positions, qkv, batch)
        if isinstance(self.mlp, MLP):
            gate_up, residual = self.mlp.gate_up_proj.forward_normed(self.post_attention_layernorm, x,
                                                                     residual)
            return self.mlp(gate_up), residual
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


# Checkpoint names of one expert's matrices → the part of the stacked weight they fill.
_EXPERT = re.compile(r"\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PARTS = {"w1": ("w13", "gate"), "w3": ("w13", "up"), "w2": ("w2", "down"),
          "gate_proj": ("w13", "gate"), "up_proj": ("w13", "up"), "down_proj": ("w2", "down")}
_STACKED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    qk_norm = False

    def make_layer(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        return MoeDecoderLayer(cfg, layer_id, self.qk_norm)

    def param_name(self, name: str) -> tuple[str, object]:
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral
        if ".experts." in name and name.endswith(("_scale", "_scale_inv")):
            raise ValueError(f"checkpoint tensor {name!r}: FP8 expert weights are not supported yet; "
                             "serve the model's bf16 checkpoint (quantization='fp8' then quantizes its "
                             "attention and dense layers)")
        m = _EXPERT.search(name)
        if m is not None:
            param, part = _PARTS[m.group(2)]
            return f"{name[:m.start()]}.experts.{param}", (int(m.group(1)), part)
        m = _STACKED.search(name.removesuffix(".weight"))
        if m is not None:
            stacked = m.group(1)
            param, part = ("w13", "gate_up") if stacked == "gate_up_proj" else ("w2", "down")
            return f"{name[:m.start()]}.experts.{param}", (None, part)
        return super().param_name(name)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    qk_norm = True


class MixtralForCausalLM(Qwen2MoeForCausalLM):
    """Mixtral: Mistral's attention, every layer sparse, top-k always renormalised."""
