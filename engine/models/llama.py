"""Llama-family decoder (Llama 2/3/3.x, Mistral, SmolLM2) and Qwen2/2.5/Qwen3.

The families differ only in switches read from the config: q/k/v bias (Qwen2), per-head
q/k RMSNorm (Qwen3), tied embeddings (SmolLM2, small Qwen).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from radixfleet.engine.executor.forward_batch import ForwardBatch
from radixfleet.engine.layers import distributed as dist
from radixfleet.engine.layers.activation import SiluAndMul
from radixfleet.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from radixfleet.engine.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from radixfleet.engine.layers.norm import RMSNorm, fusable_qk_norms, qk_norms
from radixfleet.engine.layers.rotary import get_rope
from radixfleet.engine.models.model_config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, qk_norm: bool):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                          cfg.num_kv_heads, bias=cfg.attention_bias)
        self.num_heads = self.qkv_proj.q_heads  # per rank
        self.num_kv_heads = self.qkv_proj.kv_heads
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.rotary = get_rope(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                               cfg.rope_scaling)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if qk_norm else None

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """``qkv``: this layer's ``qkv_proj`` output (the decoder layer runs the projection
        together with the norm before it)."""
        t = qkv.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        backend = batch.attn_backend
        table = self.rotary.fused_table(q, k) if backend.fuses_rope else None
        qk_norm = None  # (wq, wk, eps) when the norms run inside the backend's rotary launch
        if self.q_norm is not None:
            if table is not None and fusable_qk_norms(self.q_norm, self.k_norm, table.shape[1] == self.head_dim):
                qk_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
            else:
                q, k = qk_norms(q, k, self.q_norm, self.k_norm)
        if table is not None:  # the backend (norms and) rotates q and k as it stores k/v (one launch)
            o = backend.forward(q, k, v, self.layer_id, batch, rope=(positions, table, qk_norm))
        else:
            q, k = self.rotary(positions, q, k)
            o = backend.forward(q, k, v, self.layer_id, batch)  # [T, H, D]
        return self.o_proj(o.reshape(t, q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size, cfg.intermediate_size], bias=False)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = SiluAndMul()

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``gate_up``: this MLP's ``gate_up_proj`` output (run with the norm before it)."""
        return self.down_proj.forward_silu_mul(gate_up, self.act)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, qk_norm: bool):
        super().__init__()
        self.self_attn = Attention(cfg, layer_id, qk_norm)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, batch):
        # Each norm runs with the projection after it: inside its GEMV at batch 1 on CUDA.
        qkv, residual = self.self_attn.qkv_proj.forward_normed(self.input_layernorm, x, residual)
        x = self.self_attn(positions, qkv, batch)
        gate_up, residual = self.mlp.gate_up_proj.forward_normed(self.post_attention_layernorm, x,
                                                                 residual)
        return self.mlp(gate_up), residual


class LlamaForCausalLM(nn.Module):
    qk_norm = False

    # checkpoint name fragment -> (our parameter fragment, shard id)
    stacked_params = (
        (".q_proj", ".qkv_proj", "q"),
        (".k_proj", ".qkv_proj", "k"),
        (".v_proj", ".qkv_proj", "v"),
        (".gate_proj", ".gate_up_proj", 0),
        (".up_proj", ".gate_up_proj", 1),
    )

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def make_layer(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        return DecoderLayer(cfg, layer_id, self.qk_norm)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Returns final hidden states ``[T, hidden]`` for every new token."""
        x = self.embed_tokens(batch.input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(batch.positions, x, residual, batch)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def param_name(self, name: str) -> tuple[str, object]:
        """Checkpoint tensor name (without ``model.``) → (our parameter name, shard id for its
        ``weight_loader``)."""
        for ckpt, ours, sid in self.stacked_params:
            if ckpt in name:
                return name.replace(ckpt, ours), sid
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            name, shard_id = self.param_name(name)
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
            param = params[name]
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                param.data.copy_(tensor)
            else:
                # fp8 layers take checkpoint tensors as stored (layers/fp8.py).
                raw = getattr(param, "raw_checkpoint_dtype", False)
                loader(param, tensor if raw else tensor.to(param.dtype), shard_id)
            loaded.add(name)
        missing = {n for n in params if n not in loaded and not n.startswith("lm_head")
                   and not getattr(params[n], "derived", False)}
        if self.config.tie_word_embeddings:
            missing.discard("lm_head.weight")
        elif "lm_head.weight" not in loaded:
            missing.add("lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        _ = dist  # parallel state is read by the layers


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
