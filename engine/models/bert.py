"""BERT-family encoders as embedding models (all-MiniLM-L6-v2, BGE, E5 ...): a bidirectional
forward over whole prompts, then sentence-transformers' pooling.

No KV cache: an embedding request is one forward and done. A batch is padded to its
longest prompt and padded keys are masked out of attention and pooling.

Pooling follows the model folder's sentence-transformers files (``modules.json``,
``1_Pooling/config.json``: cls / mean / max / last-token, and a ``Normalize`` module);
without them, the [CLS] token, L2-normalised (what SGLang does for BERT).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from radixfleet.engine.models.model_config import ModelConfig

POOLING_MODES = ("cls", "mean", "max", "lasttoken")


@dataclass(frozen=True)
class Pooling:
    mode: str = "cls"
    normalize: bool = True

    @classmethod
    def from_folder(cls, folder: str, default: Pooling | None = None) -> Pooling:
        """What the folder's sentence-transformers files say; ``default`` (CLS + L2) without them."""
        modules_path = os.path.join(folder, "modules.json")
        if not os.path.isfile(modules_path):
            return default or cls()
        with open(modules_path) as f:
            modules = json.load(f)
        mode, normalize = "cls", False
        for module in modules:
            kind = module.get("type", "")
            if kind.endswith(".Normalize"):
                normalize = True
            elif kind.endswith(".Pooling"):
                with open(os.path.join(folder, module.get("path", ""), "config.json")) as f:
                    pool = json.load(f)
                chosen = [m for m in POOLING_MODES if pool.get(f"pooling_mode_{m}_token")
                          or pool.get(f"pooling_mode_{m}_tokens") or pool.get(f"pooling_mode_{m}")]
                if len(chosen) != 1:
                    raise ValueError(f"{folder}: pooling config {pool} must select exactly one of "
                                     f"{', '.join(POOLING_MODES)}")
                mode = chosen[0]
        return cls(mode, normalize)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, H], mask [B, S] (True on real tokens), lengths [B] → [B, H] fp32."""
        hidden = hidden.float()
        if self.mode == "cls":
            out = hidden[:, 0]
        elif self.mode == "mean":
            out = (hidden * mask[..., None]).sum(1) / lengths[:, None]
        elif self.mode == "max":
            out = hidden.masked_fill(~mask[..., None], float("-inf")).amax(1)
        else:
            out = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        return F.normalize(out, dim=-1) if self.normalize else out


class BertLayer(nn.Module):
    """Post-LN encoder layer: self-attention, add & norm, GELU MLP, add & norm."""

    def __init__(self, hidden: int, heads: int, inter: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, inter)
        self.down = nn.Linear(inter, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape  # x [B, S, H]; attn_mask [B, 1, 1, S] bool, True = attend
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, heads, S, D]
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(b, s, h)))
        return self.out_norm(x + self.down(F.gelu(self.up(x))))


class BertEmbeddingModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hf = config.hf
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"BERT hidden_act {hf.get('hidden_act')!r} is not supported (only gelu)")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported for BERT models")
        eps = hf.get("layer_norm_eps", 1e-12)
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(hf.get("type_vocab_size", 2), config.hidden_size)
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.layers = nn.ModuleList(
            BertLayer(config.hidden_size, config.num_heads, config.intermediate_size, eps)
            for _ in range(config.num_layers))
        self.pad_id = hf.get("pad_token_id") or 0

    @torch.inference_mode()
    def embed(self, batch: list[list[int]], pooling: Pooling) -> torch.Tensor:
        """Token id lists (each within max_position_embeddings) → [B, H] fp32 embeddings."""
        dev = self.word.weight.device
        lengths = torch.tensor([len(ids) for ids in batch], device=dev)
        ids = torch.full((len(batch), int(lengths.max())), self.pad_id, dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, :len(row)] = torch.tensor(row)
        ids = ids.to(dev)
        mask = torch.arange(ids.shape[1], device=dev)[None, :] < lengths[:, None]  # [B, S]
        x = self.word(ids) + self.position.weight[: ids.shape[1]] + self.token_type.weight[0]
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, mask[:, None, None, :])
        return pooling(x, mask, lengths)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF ``BertModel`` names (also under a ``bert.`` prefix); the pooler and any MLM
        head are not used for embeddings."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        simple = {"embeddings.word_embeddings.weight": "word.weight",
                  "embeddings.position_embeddings.weight": "position.weight",
                  "embeddings.token_type_embeddings.weight": "token_type.weight",
                  "embeddings.LayerNorm.weight": "embed_norm.weight",
                  "embeddings.LayerNorm.bias": "embed_norm.bias"}
        per_layer = {"attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
                     "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "out_norm"}
        for name, tensor in weights:
            name = name.removeprefix("bert.")
            target = simple.get(name)
            if name.startswith("encoder.layer."):
                idx, rest = name.removeprefix("encoder.layer.").split(".", 1)
                module, _, kind = rest.rpartition(".")
                if module.startswith("attention.self."):
                    qkv.setdefault((int(idx), kind), {})[module.rsplit(".", 1)[1]] = tensor
                    continue
                if module in per_layer:
                    target = f"layers.{idx}.{per_layer[module]}.{kind}"
            if target is None:
                continue  # pooler, position_ids, MLM head
            params[target].data.copy_(tensor)
            loaded.add(target)
        for (idx, kind), parts in qkv.items():
            target = f"layers.{idx}.qkv.{kind}"
            params[target].data.copy_(torch.cat([parts["query"], parts["key"], parts["value"]]))
            loaded.add(target)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks weights for {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
