"""Reference attention backend in plain torch (CPU and GPU).

Extend: per request, causal SDPA. A request with no cached prefix attends to its own new
k/v directly (no gather); one with a prefix gathers its context's KV slots and offsets the
new tokens' queries by the prefix length. Decode: all requests at once over a padded
``[B, max_len]`` gather with a length mask; the query heads of one KV head are folded into
the query-length dimension, so SDPA needs no GQA expansion of the keys.

Sliding windows and soft-capped logits (``AttentionBackend.configure``) are masks and an
explicit softmax here; the KV cache keeps every token, so the radix cache and chunked
prefill need nothing special: each query's window is counted from its absolute position.
A window no shorter than the step's longest context changes nothing and is dropped for the
step (so such layers keep the C decode kernel and SDPA's causal path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixfleet.engine.attention.base import AttentionBackend
from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode
from radixfleet.kernels import cpu_ops


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float, cap: float | None) -> torch.Tensor:
    """SDPA over ``[..., L, D]`` inputs (``mask``: True = attend; None: causal), with the
    scaled logits soft-capped first when ``cap`` is set (computed as transformers' eager path)."""
    if cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              scale=scale)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = torch.tanh(s / cap) * cap
    if mask is None:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(s.shape[-1] - s.shape[-2])
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, -1, dtype=torch.float32).to(q.dtype), v)


def window_mask(n: int, prefix: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``[n, prefix + n]`` bool: query i (position prefix + i) sees keys
    ``prefix + i - window + 1 .. prefix + i`` (all up to it when ``window`` is None)."""
    mask = torch.ones(n, prefix + n, dtype=torch.bool, device=device).tril(prefix)
    return mask if window is None else mask.triu(prefix - window + 1)


class TorchNativeBackend(AttentionBackend):
    supports_sliding_window = True
    supports_logit_cap = True

    def plan(self, batch: ForwardBatch) -> None:
        self._cpu_decode = None
        self._extend_masks: dict[tuple[int, int | None], torch.Tensor | None] = {}
        self._max_len = max(batch.seq_lens_cpu)
        layers = range(len(self.sliding_windows))
        plain = self.logit_cap is None and all(self._window(i) is None for i in layers)
        if batch.mode is ForwardMode.DECODE and self.kv_pool.kv_buffers is not None \
                and cpu_ops.usable(self.kv_pool.kv_buffers[0]):
            # One C call per layer reads K/V straight from the pool (kernels/cpu_ops.c): the
            # layers with neither a window nor a soft cap.
            self._cpu_decode = (batch.req_to_token, batch.req_pool_indices.long().contiguous(),
                                batch.seq_lens.to(torch.int32).contiguous(), max(batch.seq_lens_cpu))
        if batch.mode is ForwardMode.DECODE and (self._cpu_decode is None or not plain):
            max_len = max(batch.seq_lens_cpu)
            rows = batch.req_to_token[batch.req_pool_indices, :max_len].long()  # [B, L]
            lens = batch.seq_lens.to(rows.device).long()
            idx = torch.arange(max_len, device=rows.device)[None, :]
            valid = idx < lens[:, None]  # [B, L]
            self._decode_slots = rows.masked_fill(~valid, 0)
            self._decode_flat = self._decode_slots.flatten()
            # [B, 1, 1, L] for SDPA, per window: the last `window` tokens of each context.
            self._decode_masks = {
                w: (valid if w is None else valid & (idx >= lens[:, None] - w))[:, None, None, :]
                for w in {None, *self.sliding_windows}}
        elif batch.mode is not ForwardMode.DECODE:
            self._extend_slots = [
                batch.req_to_token[int(r), :n].long() if prefix else None
                for r, n, prefix in zip(batch.req_pool_indices.tolist(), batch.seq_lens_cpu,
                                        batch.extend_prefix_lens_cpu)
            ]

    def _window(self, layer_id: int) -> int | None:
        """The layer's window where it matters this step (some context is longer)."""
        w = self.window(layer_id)
        return w if w is not None and w < self._max_len else None

    def forward(self, q, k, v, layer_id, batch):
        self.kv_pool.store(layer_id, batch.out_cache_loc, k, v)
        if batch.mode is ForwardMode.DECODE:
            return self._decode(q, layer_id)
        return self._extend(q, k, v, layer_id, batch)

    def _decode(self, q, layer_id):
        window = self._window(layer_id)
        if self._cpu_decode is not None and window is None and self.logit_cap is None:
            table, rows, lens, max_len = self._cpu_decode
            return cpu_ops.decode_attention(q, self.kv_pool.kv_buffers[layer_id], table, rows, lens,
                                            max_len, self.scale)
        b, n = self._decode_slots.shape
        pool = self.kv_pool
        # index_select is ~2x faster than advanced indexing on CPU; with K and V interleaved
        # (the CPU layout) one gather fetches both.
        if pool.kv_buffers is not None:
            kv = pool.kv_buffers[layer_id].index_select(0, self._decode_flat)
            kv = kv.view(b, n, 2, self.num_kv_heads, self.head_dim)
            keys, vals = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        else:
            k_buf, v_buf = pool.k_buffers[layer_id], pool.v_buffers[layer_id]
            keys = k_buf.index_select(0, self._decode_flat).view(b, n, *k_buf.shape[1:]).transpose(1, 2)
            vals = v_buf.index_select(0, self._decode_flat).view(b, n, *v_buf.shape[1:]).transpose(1, 2)
        # keys/vals: [B, KVH, L, D]; queries [B, KVH, H/KVH, D] (heads of a group are adjacent).
        group = self.num_heads // self.num_kv_heads
        out = attend(q.reshape(b, self.num_kv_heads, group, self.head_dim), keys, vals,
                     self._decode_masks[window], self.scale, self.logit_cap)
        return out.reshape(b, self.num_heads, self.head_dim)

    def _extend(self, q, k, v, layer_id, batch):
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        group = self.num_heads // self.num_kv_heads
        window = self._window(layer_id)
        out = torch.empty_like(q)
        start = 0
        for i, (slots, prefix, n) in enumerate(zip(self._extend_slots, batch.extend_prefix_lens_cpu,
                                                   batch.extend_seq_lens_cpu)):
            if slots is None:  # no cached prefix: the context is exactly the new tokens
                keys, vals = k[start:start + n], v[start:start + n]
            else:
                keys, vals = k_buf.index_select(0, slots), v_buf.index_select(0, slots)
            mask = None  # causal over the new tokens alone
            if slots is not None or (window is not None and window < n):
                # Query i (absolute position prefix + i) sees keys up to prefix + i, in its window.
                key = (i, window)
                if key not in self._extend_masks:
                    self._extend_masks[key] = window_mask(n, prefix, window, q.device)
                mask = self._extend_masks[key]
            if group > 1:
                # Expanded keys in 4-D inputs take SDPA's fused kernel; enable_gqa takes the
                # unfused math path on CPU (~3x slower at these sizes).
                keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)
            o = attend(q[start:start + n].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                       vals.transpose(0, 1)[None], mask, self.scale, self.logit_cap)
            out[start:start + n] = o[0].transpose(0, 1)
            start += n
        return out
