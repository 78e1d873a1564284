"""Frequency, presence and repetition penalties from token counts held on the device.

State: ``counts[row, token]`` (int32) is how often ``token`` occurs in the output of the
request that holds req-table row ``row``; ``in_prompt[row, token]`` marks its prompt tokens
(the repetition penalty covers prompt and output, the other two output only). A row is
(re)built from the request's token lists when a request uses it for the first time (the
state remembers which request each row was built for: a retracted request that returns on
another row, or on its old row after another request used it, is rebuilt), then updated by
one scatter per step.
"""

from __future__ import annotations

import torch

from radixfleet.engine.memory.transfer import to_device


class PenaltyState:
    def __init__(self, num_rows: int, vocab_size: int, device: torch.device):
        self.num_rows, self.vocab_size, self.device = num_rows, vocab_size, device
        self._counts: torch.Tensor | None = None  # [rows, V] int32, allocated on first use
        self._in_prompt: torch.Tensor | None = None  # [rows, V] bool
        self._owner: list[str | None] = [None] * num_rows  # rid each row was built for

    def _ensure(self) -> None:
        if self._counts is None:
            shape = (self.num_rows, self.vocab_size)
            self._counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self._in_prompt = torch.zeros(shape, dtype=torch.bool, device=self.device)

    def prepare(self, reqs) -> torch.Tensor:
        """Make sure every request's row is built; return the rows [B] int64."""
        self._ensure()
        for r in reqs:
            if self._owner[r.row] != r.rid:
                self._counts[r.row].zero_()
                self._in_prompt[r.row].zero_()
                if r.output_ids:
                    out = to_device(r.output_ids, torch.int64, self.device)
                    self._counts[r.row].scatter_add_(0, out, torch.ones_like(out, dtype=torch.int32))
                self._in_prompt[r.row, to_device(r.input_ids, torch.int64, self.device)] = True
                self._owner[r.row] = r.rid
        return to_device([r.row for r in reqs], torch.int64, self.device)

    def apply(self, logits: torch.Tensor, rows: torch.Tensor, freq: torch.Tensor,
              presence: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
        """logits [B, V] of the requests on ``rows``; freq/presence/repetition [B, 1]."""
        counts = self._counts[rows]  # [B, V]
        logits = apply_penalties(logits, counts, self._in_prompt[rows], freq, presence, repetition)
        return logits

    def record(self, rows: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Count the tokens just sampled for the penalised requests."""
        self._counts.index_put_((rows, next_ids), torch.ones_like(rows, dtype=torch.int32),
                                accumulate=True)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor,
                    freq: torch.Tensor, presence: torch.Tensor,
                    repetition: torch.Tensor) -> torch.Tensor:
    """The reference rules, vectorised over the batch.

    - repetition (CTRL/HF): tokens in prompt or output get logit / r if positive, × r if not;
    - frequency, presence (OpenAI): logit -= f × count + p × [count > 0] over output tokens.
    """
    seen = counts > 0
    # Unconditional (a factor of 1 leaves logits bit-identical): testing for it would make
    # the host wait for the device.
    scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen | in_prompt, scaled, logits)
    return logits - freq * counts.to(logits.dtype) - presence * seen.to(logits.dtype)
