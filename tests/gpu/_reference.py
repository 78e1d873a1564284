"""Plain-torch references and random paged-KV layouts shared by the kernel tests, plus a
reference attention backend and a ForwardBatch builder shared by the backend tests.

References compute in fp32 over gathered slots: no kernel code, no SDPA.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

import pytest
import torch

from radixfleet.engine.attention.base import AttentionBackend
from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode

HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
NEEDS_FLASHINFER = pytest.mark.skipif(not HAS_FLASHINFER, reason="needs flashinfer-python")
# The CUDA attention backends as test parameters (flashinfer skipped, saying why, without it).
GPU_BACKENDS = ["triton", pytest.param("flashinfer", marks=NEEDS_FLASHINFER)]


def attention_ref(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor,
                  prefix_len: int, scale: float, window: int | None = None,
                  cap: float | None = None) -> torch.Tensor:
    """One request: q [n, H, D] at positions prefix_len.. over slots [prefix_len + n] → [n, H, D] fp32.
    ``window``: query position p sees keys p - window + 1 .. p only; ``cap``: logits soft-capped."""
    n, H, _ = q.shape
    keys = k_buf[slots].float()  # [L, KVH, D]
    vals = v_buf[slots].float()
    group = H // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
    vals = vals.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.einsum("nhd,hld->hnl", q.float(), keys) * scale  # [H, n, L]
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    L = keys.shape[1]
    # Query i (absolute position prefix_len + i) sees keys 0 .. prefix_len + i.
    key_pos = torch.arange(L, device=q.device)[None, :]
    q_pos = prefix_len + torch.arange(n, device=q.device)[:, None]
    visible = key_pos <= q_pos
    if window is not None:
        visible &= key_pos > q_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hnl,hld->nhd", scores.softmax(-1), vals)


@dataclass
class PagedKV:
    k_buf: torch.Tensor  # [S, KVH, D]
    v_buf: torch.Tensor
    req_to_token: torch.Tensor  # [R, Lmax] int32
    req_pool_indices: torch.Tensor  # [B] int64
    seq_lens: torch.Tensor  # [B] int32

    def slots(self, b: int, n: int | None = None) -> torch.Tensor:
        row = int(self.req_pool_indices[b])
        n = int(self.seq_lens[b]) if n is None else n
        return self.req_to_token[row, :n].long()


def make_paged_kv(seq_lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  device: str, gen: torch.Generator, extra_slots: int = 64) -> PagedKV:
    """Random k/v in a pool whose slots are handed out in shuffled order (slot 0 never used).

    Requests sit at shuffled rows of a table with spare rows and columns; unused table
    entries hold slot 0 so that a kernel reading past seq_len would read the padding slot.
    """
    total = sum(seq_lens)
    num_slots = total + extra_slots + 1
    k_buf = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    v_buf = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    # Poison the padding slot: any read of it shows up as a large error.
    k_buf[0] = 100.0
    v_buf[0] = 100.0
    perm = torch.randperm(num_slots - 1, generator=gen)[:total] + 1
    B = len(seq_lens)
    rows = torch.randperm(B + 3, generator=gen)[:B]
    table = torch.zeros(B + 3, max(seq_lens) + 17, dtype=torch.int32)
    start = 0
    for b, n in enumerate(seq_lens):
        table[rows[b], :n] = perm[start:start + n].int()
        start += n
    return PagedKV(k_buf, v_buf, table.to(device), rows.long().to(device),
                   torch.tensor(seq_lens, dtype=torch.int32, device=device))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp32."""
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


class ReferenceBackend(AttentionBackend):
    """Index-assign store, then per request a plain softmax over the gathered slots (with the
    layer's sliding window and the logit cap, when ``configure`` sets them)."""

    supports_sliding_window = True
    supports_logit_cap = True

    def forward(self, q, k, v, layer_id, batch):
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        k_buf[batch.out_cache_loc] = k
        v_buf[batch.out_cache_loc] = v
        out, start = [], 0
        for b, (n, prefix) in enumerate(zip(batch.extend_seq_lens_cpu, batch.extend_prefix_lens_cpu,
                                            strict=True)):
            slots = batch.req_to_token[batch.req_pool_indices[b], :prefix + n].long()
            out.append(attention_ref(q[start:start + n], k_buf, v_buf, slots, prefix, self.scale,
                                     self.window(layer_id), self.logit_cap))
            start += n
        return torch.cat(out).to(q.dtype)


class Step:
    """Builds ForwardBatches over a shared req_to_token table and a slot free list."""

    def __init__(self, num_slots: int, rows: list[int], gen: torch.Generator):
        self.req_to_token = torch.zeros(8, 4096, dtype=torch.int32, device="cuda")
        self.free = (torch.randperm(num_slots - 1, generator=gen) + 1).tolist()
        self.rows = rows
        self.lens = [0] * len(rows)

    def batch(self, mode: ForwardMode, new: list[int]) -> ForwardBatch:
        locs = []
        for b, n in enumerate(new):
            slots = [self.free.pop() for _ in range(n)]
            self.req_to_token[self.rows[b], self.lens[b]:self.lens[b] + n] = torch.tensor(slots, dtype=torch.int32)
            locs += slots
        prefix = list(self.lens)
        self.lens = [p + n for p, n in zip(prefix, new, strict=True)]
        return ForwardBatch.from_host(mode, [0] * len(locs), self.rows, torch.tensor(locs),
                                      self.req_to_token, prefix, new)


def check_decode_graph_replays(backend: AttentionBackend, ref: AttentionBackend, step: Step,
                               heads: int, kv_heads: int, head_dim: int, gen: torch.Generator,
                               replays: int) -> None:
    """Capture one decode forward of ``backend`` (layer 0) in a CUDA graph, as the engine's
    graph runner does, then replay it as the sequences grow: before each replay the static
    inputs are refilled and the backend is re-planned with the new host lengths (the batch
    is marked ``cuda_graph``); every replay must match ``ref`` run eagerly."""
    bs = len(step.rows)
    batch = dataclasses.replace(step.batch(ForwardMode.DECODE, [1] * bs), cuda_graph=True)
    static = [torch.randn(bs, h, head_dim, generator=gen).to(torch.bfloat16).cuda()
              for h in (heads, kv_heads, kv_heads)]
    backend.plan(batch)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (kernel compilation) outside the capture
        backend.forward(*static, 0, batch)
    torch.cuda.current_stream().wait_stream(stream)
    ref.plan(batch)
    ref.forward(*static, 0, batch)  # stores the same k/v the warm-up did
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = backend.forward(*static, 0, batch)
    for i in range(replays):
        nxt = step.batch(ForwardMode.DECODE, [1] * bs)
        for name in ("seq_lens", "out_cache_loc", "positions"):
            getattr(batch, name).copy_(getattr(nxt, name))
        for t in static:
            t.copy_(torch.randn(t.shape, generator=gen).to(torch.bfloat16))
        backend.plan(dataclasses.replace(batch, seq_lens_cpu=list(nxt.seq_lens_cpu)))
        graph.replay()
        ref.plan(nxt)
        err = rel_err(graph_out, ref.forward(*static, 0, nxt))
        assert err < 1e-2, f"replay {i}: rel err {err:.2e}"


def default_model_or_skip() -> str:
    """The prepared default model's folder (SmolLM2), or skip the test saying why not."""
    from radixfleet.engine.models.model_prep import prepare_default_model

    try:
        return str(prepare_default_model())
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"default model unavailable: {e}")
