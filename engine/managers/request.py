"""A request as the scheduler sees it: plain data, no tensors but its slot list."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from radixfleet.engine.memory.radix_cache import TreeNode
from radixfleet.engine.sampling.logprobs import ReqOutputs
from radixfleet.engine.sampling.params import SamplingParams


@dataclass(eq=False)
class Req:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    stream: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    finished_reason: dict | None = None
    # KV state. Invariant: req_table row ``row`` holds the slots of the first kv_len tokens
    # of ``fill_ids`` + the ``pending`` ones; the first ``len(prefix_slots)`` of
    # them belong to the radix tree (locked through ``last_node``), the rest to this request.
    # A slot below kv_len holds valid KV once the device work launched so far has run (all
    # of it is on one stream, so work launched later sees it).
    row: int | None = None
    kv_len: int = 0
    # Tokens sampled on the device (their ids in the scheduler's ``last_token``) but not yet
    # appended to ``output_ids``: at most 1 between steps with the overlap schedule (2 while
    # the next step is launched before the previous one is processed), else 0. A decoding
    # request has ``kv_len == total_len - 1`` between steps: the newest token lacks KV.
    pending: int = 0
    prefix_slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    last_node: TreeNode | None = None
    # What this step computes: tokens [kv_len, kv_len + extend_len) of fill_ids.
    extend_len: int = 0
    cached_tokens: int = -1  # prefix reuse reported to the user; set at first admission
    sent_len: int = 0  # output tokens already sent to the detokenizer
    first_scheduled_time: float | None = None
    retractions: int = 0
    deferred: bool = False  # once waited a step for a batch member's prefix (prefill.py)
    # Sampling extras (engine/sampling/): logprobs / hidden states asked for, the
    # xgrammar matcher, a custom logit processor.
    outputs: ReqOutputs | None = None
    grammar: Any = None
    custom_logit_processor: str | None = None
    lora_id: int = 0  # the LoRA adapter's index (engine/executor/lora.py); 0: the base model

    @property
    def fill_ids(self) -> list[int]:
        """Every token whose KV the request needs: prompt plus generated-so-far."""
        return self.input_ids + self.output_ids

    @property
    def total_len(self) -> int:
        """Prompt plus every sampled token, including the pending ones."""
        return len(self.input_ids) + len(self.output_ids) + self.pending

    @property
    def generated_len(self) -> int:
        """Output tokens sampled so far, including the pending ones."""
        return len(self.output_ids) + self.pending

    @property
    def max_prefix_len(self) -> int:
        """Most tokens the radix cache may supply: one is always computed (for logits),
        and prompt positions whose logprobs or hidden states are wanted must be too."""
        limit = len(self.fill_ids) - 1
        if self.outputs is not None and self.outputs.prefix_limit() is not None:
            limit = min(limit, self.outputs.prefix_limit())
        return limit

    @property
    def remaining_new_tokens(self) -> int:
        if self.params.max_new_tokens is None:
            return 1 << 30
        return max(self.params.max_new_tokens - self.generated_len, 0)

    def finish(self, kind: str, matched: int | str | None = None, message: str | None = None) -> None:
        reason: dict = {"type": kind}
        if kind != "length":
            reason["matched"] = matched
        else:
            reason["length"] = len(self.output_ids)
        if message:
            reason["message"] = message
        self.finished_reason = reason
