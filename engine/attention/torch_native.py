"""Reference attention backend in plain torch (CPU and GPU).

Extend: per request, causal SDPA. A request with no cached prefix attends to its own new
k/v directly (no gather); one with a prefix gathers its context's KV slots and offsets the
new tokens' queries by the prefix length. Decode: all requests at once over a padded
``[B, max_len]`` gather with a length mask; the query heads of one KV head are folded into
the query-length dimension, so SDPA needs no GQA expansion of the keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixfleet.engine.attention.base import AttentionBackend
from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode
from radixfleet.kernels import cpu_ops


class TorchNativeBackend(AttentionBackend):
    def plan(self, batch: ForwardBatch) -> None:
        self._cpu_decode = None
        if batch.mode is ForwardMode.DECODE and self.kv_pool.kv_buffers is not None \
                and cpu_ops.usable(self.kv_pool.kv_buffers[0]):
            # One C call per layer reads K/V straight from the pool (kernels/cpu_ops.c).
            self._cpu_decode = (batch.req_to_token, batch.req_pool_indices.long().contiguous(),
                                batch.seq_lens.to(torch.int32).contiguous(), max(batch.seq_lens_cpu))
        elif batch.mode is ForwardMode.DECODE:
            max_len = max(batch.seq_lens_cpu)
            rows = batch.req_to_token[batch.req_pool_indices, :max_len].long()  # [B, L]
            lens = batch.seq_lens.to(rows.device).long()
            valid = torch.arange(max_len, device=rows.device)[None, :] < lens[:, None]  # [B, L]
            self._decode_slots = rows.masked_fill(~valid, 0)
            self._decode_flat = self._decode_slots.flatten()
            self._decode_mask = valid[:, None, None, :]  # [B, 1, 1, L] for SDPA
        else:
            self._extend_slots = [
                batch.req_to_token[int(r), :n].long() if prefix else None
                for r, n, prefix in zip(batch.req_pool_indices.tolist(), batch.seq_lens_cpu,
                                        batch.extend_prefix_lens_cpu)
            ]

    def forward(self, q, k, v, layer_id, batch):
        self.kv_pool.store(layer_id, batch.out_cache_loc, k, v)
        if batch.mode is ForwardMode.DECODE:
            return self._decode(q, layer_id)
        return self._extend(q, k, v, layer_id, batch)

    def _decode(self, q, layer_id):
        if self._cpu_decode is not None:
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
        out = F.scaled_dot_product_attention(
            q.reshape(b, self.num_kv_heads, group, self.head_dim), keys, vals,
            attn_mask=self._decode_mask, scale=self.scale)
        return out.reshape(b, self.num_heads, self.head_dim)

    def _extend(self, q, k, v, layer_id, batch):
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        group = self.num_heads // self.num_kv_heads
        out = torch.empty_like(q)
        start = 0
        for slots, prefix, n in zip(self._extend_slots, batch.extend_prefix_lens_cpu,
                                    batch.extend_seq_lens_cpu):
            if slots is None:  # no cached prefix: the context is exactly the new tokens
                keys, vals, mask = k[start:start + n], v[start:start + n], None
            else:
                keys, vals = k_buf.index_select(0, slots), v_buf.index_select(0, slots)
                # Query i (absolute position prefix + i) sees keys 0 .. prefix + i.
                mask = torch.ones(n, prefix + n, dtype=torch.bool, device=q.device).tril(prefix)
            if group > 1:
                # Expanded keys in 4-D inputs take SDPA's fused kernel; enable_gqa takes the
                # unfused math path on CPU (~3x slower at these sizes).
                keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)
            o = F.scaled_dot_product_attention(
                q[start:start + n].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                vals.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None, scale=self.scale)
            out[start:start + n] = o[0].transpose(0, 1)
            start += n
        return out
