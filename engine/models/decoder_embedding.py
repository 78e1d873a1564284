"""Decoder-only embedding models (gte-Qwen2, e5-mistral style): the generation model's
decoder (causal attention, sliding windows included), its final-norm hidden states pooled.

Served by the ``EmbeddingScheduler`` like the BERT encoders: one forward per batch, no
radix cache. The requests of a batch are packed back to back (no padding) into a private
KV pool (grown to the largest batch seen) and run as one extend step through the same
attention backend the generation engine uses (torch_native on CPU, triton on CUDA).

Checkpoints: ``MistralModel`` / ``Qwen2Model`` / ``Qwen3Model`` / ``LlamaModel`` folders
(no LM head) are always embedding models; a ``*ForCausalLM`` folder is one with
``is_embedding=True`` (gte-Qwen2 ships as ``Qwen2ForCausalLM``). Pooling follows the
folder's sentence-transformers files, else last token + L2 normalisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from radixfleet.engine.attention.registry import default_backend, get_backend_class
from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode
from radixfleet.engine.memory.kv_pool import KVPool
from radixfleet.engine.models.bert import Pooling
from radixfleet.engine.models.model_config import ModelConfig

# Base-model architectures (no LM head) → the generation class whose decoder they are.
DECODER_BASE_ARCHS = {
    "LlamaModel": "LlamaForCausalLM",
    "MistralModel": "MistralForCausalLM",
    "Qwen2Model": "Qwen2ForCausalLM",
    "Qwen3Model": "Qwen3ForCausalLM",
}
DEFAULT_POOLING = Pooling("lasttoken", True)


class DecoderEmbeddingModel(nn.Module):
    def __init__(self, cfg: ModelConfig, decoder: type[nn.Module]):
        """``decoder``: the generation class (``registry.decoder_class``)."""
        super().__init__()
        self.config = cfg
        # The LM head is never used: tie it to the embeddings (no memory, no checkpoint tensor).
        self.model = decoder(dataclasses.replace(cfg, tie_word_embeddings=True))
        self.attention_backend: str | None = None  # None: the device's default
        self._capacity = 0  # KV slots of the private pool (slot 0 is padding)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.model.load_weights(weights)

    def _prepare(self, num_tokens: int, max_len: int, batch_size: int) -> None:
        """(Re)build the KV pool, request table and attention backend when a batch outgrows them."""
        if num_tokens + 1 <= self._capacity and self._table.shape[0] >= batch_size \
                and self._table.shape[1] >= max_len:
            return
        weight = self.model.embed_tokens.weight
        attn = self.model.layers[0].self_attn
        cfg = self.config
        self._capacity = max(2 * num_tokens + 1, 256)
        self._pool = KVPool(cfg.num_layers, self._capacity, attn.num_kv_heads, cfg.head_dim, weight.dtype,
                            weight.device)
        self._table = torch.zeros(max(batch_size, 8), max(2 * max_len, 256), dtype=torch.int32,
                                  device=weight.device)
        name = self.attention_backend or default_backend(weight.device.type)
        self._backend = get_backend_class(name)(self._pool, attn.num_heads, attn.num_kv_heads,
                                                cfg.head_dim, cfg.attn_scale)
        self._backend.configure(cfg.sliding_windows, cfg.attn_logit_cap)

    @torch.inference_mode()
    def embed(self, batch: list[list[int]], pooling: Pooling) -> torch.Tensor:
        """Token id lists → [B, hidden] fp32 embeddings."""
        lens = [len(ids) for ids in batch]
        total = sum(lens)
        self._prepare(total, max(lens), len(batch))
        slots = torch.arange(1, total + 1, dtype=torch.int64)
        table = torch.zeros(self._table.shape, dtype=torch.int32)
        start = 0
        for i, n in enumerate(lens):
            table[i, :n] = slots[start:start + n].int()
            start += n
        self._table.copy_(table)
        step = ForwardBatch.from_host(ForwardMode.EXTEND, [t for ids in batch for t in ids],
                                      list(range(len(batch))), slots, self._table, [0] * len(batch), lens)
        step.attn_backend = self._backend
        self._backend.plan(step)
        hidden = self.model(step)  # [T, hidden], after the final norm
        padded = pad_sequence(list(hidden.split(lens)), batch_first=True)  # [B, S, hidden]
        lengths = torch.tensor(lens, device=hidden.device)
        mask = torch.arange(padded.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        return pooling(padded, mask, lengths)
