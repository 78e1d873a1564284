"""The parts of an HF ``config.json`` the engine needs, read without executing model code."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from radixfleet.engine.models import attention_layout
from radixfleet.engine.models.text_config import text_config


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    torch_dtype: str | None
    eos_token_ids: tuple[int, ...]
    hf: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        hf = text_config(hf)  # a multimodal checkpoint served as text: its language model's
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry")
        heads = hf["num_attention_heads"]
        # transformers >= 5 keeps rope settings in `rope_parameters`; older configs use
        # `rope_theta` + `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        scaling = rope if rope.get("rope_type", "default") != "default" else hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=archs[0],
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 and Qwen2-MoE have q/k/v bias (transformers 5 writes `qkv_bias` for the latter).
            attention_bias=bool(hf.get("attention_bias", hf.get("qkv_bias", hf.get("model_type") in
                                                               ("qwen2", "qwen2_moe")))),
            rope_theta=float(theta),
            rope_scaling=scaling,
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype"),
            eos_token_ids=eos_ids,
            hf=hf,
        )

    @property
    def sliding_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: full attention); see ``attention_layout``."""
        return attention_layout.sliding_windows(self.hf, self.num_layers)

    @property
    def attn_scale(self) -> float:
        return attention_layout.attention_scale(self.hf, self.head_dim)

    @property
    def attn_logit_cap(self) -> float | None:
        return attention_layout.attention_logit_cap(self.hf)

    @classmethod
    def from_path(cls, model_path: str) -> ModelConfig:
        path = os.path.join(model_path, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"no config.json in {model_path!r}: expected an HF-format model folder")
        with open(path) as f:
            config = cls.from_dict(json.load(f))
        gen_path = os.path.join(model_path, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                gen = json.load(f)
            eos = gen.get("eos_token_id")
            extra = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            merged = tuple(dict.fromkeys(config.eos_token_ids + extra))
            object.__setattr__(config, "eos_token_ids", merged)
        return config
