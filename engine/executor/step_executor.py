"""The device side of a scheduler step: a batch the scheduler chose, run without waiting.

``forward`` turns the requests' host state (token ids, positions, KV slots from the
req→token table) into a ``ForwardBatch`` and returns the hidden state of each request's
newest token; ``sample`` turns chosen rows of it into next-token ids. Nothing here waits for
the device (uploads go through pinned memory, ``engine/memory/transfer.py``) unless a request wants
prompt logprobs or hidden states. The scheduler decides what runs; this module only runs it.

``last_token[row]`` (on the device) holds each req-table row's newest sampled token: every
sampling writes it, and a decode step reads its input ids from it, so a decode can be
launched before the previous step's ids reach the host (overlap schedule).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode
from radixfleet.engine.managers.request import Req
from radixfleet.engine.memory.req_table import ReqToTokenTable
from radixfleet.engine.sampling.pipeline import SamplingPipeline


@dataclass
class SampledIds:
    """Next-token ids on their way to the host."""

    ids: torch.Tensor  # [B] int64 on the host (pinned on CUDA)
    copied: torch.cuda.Event | None  # CUDA: recorded after the device→host copy

    def tolist(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.ids.tolist()


class StepExecutor:
    def __init__(self, model, table: ReqToTokenTable, sampling: SamplingPipeline, device: torch.device):
        """``model``: the ModelRunner, or the TP leader that announces each call to the followers."""
        self.model = model
        self.table = table
        self.sampling = sampling
        self.device = device
        self.last_token = torch.zeros(table.table.shape[0], dtype=torch.int64, device=device)

    def forward(self, reqs: list[Req], mode: ForwardMode) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute tokens [kv_len, kv_len + extend_len) of each request → (hidden state of
        each request's last computed token [B, H], req-table rows [B] on the device)."""
        fb = self._forward_batch(reqs, mode)
        if mode is ForwardMode.DECODE:
            return self.model.forward(fb), fb.req_pool_indices
        hidden = self.model.forward(fb, sample_last_only=False)  # every new token [T, H]
        ends = list(itertools.accumulate(fb.extend_seq_lens_cpu))
        for r, end in zip(reqs, ends, strict=True):
            if r.outputs is not None and not r.outputs.prompt_done:  # prompt logprobs / hidden states
                r.outputs.collect_prompt(hidden[end - r.extend_len:end], r.kv_len, r.input_ids,
                                         self.model.compute_logits)
        return fb.last_tokens(hidden), fb.req_pool_indices

    def sample(self, reqs: list[Req], hidden: torch.Tensor, rows: torch.Tensor) -> SampledIds:
        """Next ids of ``reqs`` from their hidden states [B, H]; written to ``last_token[rows]``
        and copied to the host without waiting."""
        next_ids = self.sampling.sample(reqs, self.model.compute_logits(hidden), hidden)
        self.last_token[rows] = next_ids
        if not next_ids.is_cuda:
            return SampledIds(next_ids, None)
        host = torch.empty(next_ids.shape, dtype=next_ids.dtype, pin_memory=True)
        host.copy_(next_ids, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return SampledIds(host, copied)

    def _forward_batch(self, reqs: list[Req], mode: ForwardMode) -> ForwardBatch:
        host = self.table.host
        locs = [host[r.row, r.kv_len:r.kv_len + r.extend_len] for r in reqs]
        ids = None
        if mode is ForwardMode.EXTEND:
            ids = []
            for r in reqs:
                ids += r.fill_ids[r.kv_len:r.kv_len + r.extend_len]
        fb = ForwardBatch.from_host(mode, ids, [r.row for r in reqs], torch.cat(locs), self.table.table,
                                    [r.kv_len for r in reqs], [r.extend_len for r in reqs])
        if any(r.lora_id for r in reqs):
            fb.lora_ids = [r.lora_id for r in reqs]
        if mode is ForwardMode.DECODE:
            # The newest token of each request, possibly sampled by a step still running.
            fb.input_ids = self.last_token[fb.req_pool_indices]
        return fb
