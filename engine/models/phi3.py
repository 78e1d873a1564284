"""Phi-3 (``Phi3ForCausalLM``): the Llama decoder with q/k/v and gate/up stored fused in the
checkpoint (``qkv_proj`` ``[(H + 2 KVH) * D, hidden]``, ``gate_up_proj`` ``[2I, hidden]``).

The fused tensors are split into their parts on load, so each TP rank takes its own heads
and its own slice of the intermediate dimension like any Llama checkpoint. Rotary: Phi-3's
default RoPE over the whole head (``partial_rotary_factor`` 1); the ``longrope`` scaling of
the 128k-context variants is refused with a clear message by ``get_rope``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from radixfleet.engine.models.llama import LlamaForCausalLM
from radixfleet.engine.models.model_config import ModelConfig


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig):
        rope = cfg.hf.get("rope_parameters") or cfg.hf.get("rope_scaling") or {}
        factor = rope.get("partial_rotary_factor", cfg.hf.get("partial_rotary_factor", 1.0))
        if factor != 1.0:
            raise ValueError(f"Phi-3 with partial_rotary_factor {factor} is not supported (only 1.0)")
        super().__init__(cfg)

    def _split_fused(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        for name, tensor in weights:
            if ".qkv_proj." in name:
                for part, t in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv]), strict=True):
                    yield name.replace("qkv_proj", part), t
            elif ".gate_up_proj." in name:
                gate, up = tensor.chunk(2, dim=0)
                yield name.replace("gate_up_proj", "gate_proj"), gate
                yield name.replace("gate_up_proj", "up_proj"), up
            else:
                yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._split_fused(weights))
