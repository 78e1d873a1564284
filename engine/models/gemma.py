"""Gemma 2 and Gemma 3 (text: ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``).

What differs from Llama, as transformers computes it:

- embeddings scaled by ``sqrt(hidden_size)`` (the factor rounded to the model dtype);
- RMSNorm scaling by ``1 + weight``, computed in fp32; four norms per layer (before and after
  attention, before and after the MLP, the "after" ones applied before the residual add);
- GeGLU MLP (``gelu_pytorch_tanh(gate) * up``);
- softmax scale ``query_pre_attn_scalar ** -0.5``; sliding-window layers alternating with
  global ones (``attention_layout``); the attention backend applies both;
- Gemma 2: attention-logit soft-capping (backend) and final-logit soft-capping
  (``cap * tanh(logits / cap)``);
- Gemma 3: per-head q/k norms (``1 + weight``), local layers' RoPE base
  ``rope_local_base_freq`` (10k), global layers' ``rope_theta`` with its scaling, and
  final-logit soft-capping only when the config sets it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from radixfleet.engine.executor.forward_batch import ForwardBatch
from radixfleet.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from radixfleet.engine.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from radixfleet.engine.layers.norm import RMSNorm
from radixfleet.engine.layers.rotary import get_rope
from radixfleet.engine.models import attention_layout
from radixfleet.engine.models.llama import Attention, LlamaForCausalLM
from radixfleet.engine.models.model_config import ModelConfig


class GemmaRMSNorm(RMSNorm):
    """``norm(x) * (1 + weight)`` in fp32, cast back (the checkpoint stores ``weight``)."""

    fusable = False  # not the fused kernels' ``weight * norm(x)``

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        act = cfg.hf.get("hidden_activation") or cfg.hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"Gemma hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size, cfg.intermediate_size], bias=False)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


def gemma3_rope(hf: dict[str, Any], sliding: bool) -> tuple[float, dict[str, Any] | None]:
    """``(theta, scaling)`` of a Gemma 3 layer: transformers >= 5 writes ``rope_parameters``
    per layer type; older configs ``rope_theta`` + ``rope_scaling`` (global layers) and
    ``rope_local_base_freq`` (sliding layers)."""
    params = hf.get("rope_parameters") or {}
    per_type = params.get("sliding_attention" if sliding else "full_attention")
    if isinstance(per_type, dict):
        rope = dict(per_type)
        theta = rope.pop("rope_theta", 10_000.0 if sliding else 1_000_000.0)
    elif sliding:
        return float(hf.get("rope_local_base_freq", 10_000.0)), None
    else:
        theta, rope = hf.get("rope_theta", 1_000_000.0), dict(hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    return float(theta), (rope if kind not in (None, "default") else None)


class GemmaAttention(Attention):
    def __init__(self, cfg: ModelConfig, layer_id: int, gemma3: bool, sliding: bool):
        super().__init__(cfg, layer_id, qk_norm=False)
        if gemma3:
            self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            theta, scaling = gemma3_rope(cfg.hf, sliding)
            self.rotary = get_rope(cfg.head_dim, cfg.max_position_embeddings, theta, scaling)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, gemma3: bool, sliding: bool):
        super().__init__()
        self.self_attn = GemmaAttention(cfg, layer_id, gemma3, sliding)
        self.mlp = GemmaMLP(cfg)
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        h = self.self_attn(positions, self.self_attn.qkv_proj(self.input_layernorm(x)), batch)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Weights load as Llama's (q/k/v and gate/up stacked; the norms by name)."""

    gemma3 = False

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.config = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        types = attention_layout.layer_types(cfg.hf, cfg.num_layers)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(cfg, i, self.gemma3, types[i] == "sliding_attention")
            for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # In the model dtype, as transformers multiplies (built under build_model's default dtype).
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=torch.get_default_dtype()).item()
        cap = cfg.hf.get("final_logit_softcapping")
        self.final_logit_cap = float(cap) if cap else None

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        x = x * self.embed_scale
        for layer in self.layers:
            x = layer(batch.positions, x, batch)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.logits(hidden)
        if self.final_logit_cap is not None:
            logits = torch.tanh(logits / self.final_logit_cap) * self.final_logit_cap
        return logits


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Also the language model of ``Gemma3ForConditionalGeneration`` checkpoints (text only:
    the vision tower and projector are not loaded)."""

    gemma3 = True
    _SKIPPED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                "model.multi_modal_projector.")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def text_only():
            for name, tensor in weights:
                if not name.startswith(self._SKIPPED):
                    # language_model.model.X (older saves) / model.language_model.X (newer)
                    yield name.removeprefix("language_model.").removeprefix("model.language_model."), tensor

        super().load_weights(text_only())
