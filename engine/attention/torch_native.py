"""Reference attention backend in plain torch (CPU and GPU).

Extend: per request, gather the context's KV slots and run causal SDPA with the new tokens'
queries offset by the cached prefix. Decode: all requests at once over a padded
``[B, max_len]`` gather with a length mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixfleet.engine.attention.base import AttentionBackend, ForwardBatch, ForwardMode


class TorchNativeBackend(AttentionBackend):
    def plan(self, batch: ForwardBatch) -> None:
        if batch.mode is ForwardMode.DECODE:
            max_len = max(batch.seq_lens_cpu)
            rows = batch.req_to_token[batch.req_pool_indices, :max_len].long()  # [B, L]
            lens = batch.seq_lens.to(rows.device).long()
            valid = torch.arange(max_len, device=rows.device)[None, :] < lens[:, None]  # [B, L]
            self._decode_slots = rows.masked_fill(~valid, 0)
            self._decode_flat = self._decode_slots.flatten()
            self._decode_mask = valid[:, None, None, :]  # [B, 1, 1, L] for SDPA
        else:
            self._extend_slots = [
                batch.req_to_token[int(r), :n].long()
                for r, n in zip(batch.req_pool_indices.tolist(), batch.seq_lens_cpu)
            ]

    def forward(self, q, k, v, layer_id, batch):
        self.kv_pool.store(layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        if batch.mode is ForwardMode.DECODE:
            return self._decode(q, k_buf, v_buf)
        return self._extend(q, k_buf, v_buf, batch)

    def _decode(self, q, k_buf, v_buf):
        b, n = self._decode_slots.shape
        # index_select is ~2x faster than advanced indexing on CPU.
        keys = k_buf.index_select(0, self._decode_flat).view(b, n, *k_buf.shape[1:]).transpose(1, 2)
        vals = v_buf.index_select(0, self._decode_flat).view(b, n, *v_buf.shape[1:]).transpose(1, 2)
        # keys/vals: [B, KVH, L, D]
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, vals, attn_mask=self._decode_mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)  # [B, H, 1, D]
        return out.squeeze(2)

    def _extend(self, q, k_buf, v_buf, batch):
        out = torch.empty_like(q)
        start = 0
        for slots, prefix, n in zip(self._extend_slots, batch.extend_prefix_lens_cpu,
                                    batch.extend_seq_lens_cpu):
            qi = q[start:start + n].transpose(0, 1)  # [H, n, D]
            keys = k_buf[slots].transpose(0, 1)  # [KVH, prefix + n, D]
            vals = v_buf[slots].transpose(0, 1)
            # Query i (absolute position prefix + i) sees keys 0 .. prefix + i.
            mask = torch.ones(n, prefix + n, dtype=torch.bool, device=q.device).tril(prefix)
            o = F.scaled_dot_product_attention(
                qi, keys, vals, attn_mask=mask, scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads)
            out[start:start + n] = o.transpose(0, 1)
            start += n
        return out
