"""From a batch's raw logits to its next tokens, in SGLang's order.

    raw logits ─► logprobs (raw log-softmax, for requests that asked)
               ─► custom logit processors ─► logit_bias ─► penalties (device counts)
               ─► grammar bitmask ─► min_new_tokens (EOS / stop ids → -inf)
               ─► temperature, top-k / top-p / min-p, seeded or batched draw
    then: penalty counts, grammar state, logprobs and hidden states are recorded.

Every step works on whole-batch tensors; the only per-request Python is building index
lists, filling the grammar bitmask (xgrammar, batched) and seeded draws (their rows only).
"""

from __future__ import annotations

import torch

from radixfleet.engine.memory.transfer import to_device
from radixfleet.engine.sampling.custom_logit_processor import apply_processors
from radixfleet.engine.sampling.grammar import GrammarMasker
from radixfleet.engine.sampling.logprobs import record_output
from radixfleet.engine.sampling.penalties import PenaltyState
from radixfleet.engine.sampling.sampler import SamplingBatchInfo, sample


def has_penalty(p) -> bool:
    return p.frequency_penalty != 0 or p.presence_penalty != 0 or p.repetition_penalty != 1


class SamplingPipeline:
    def __init__(self, vocab_size: int, num_rows: int, device: torch.device,
                 generator: torch.Generator, eos_ids: tuple[int, ...]):
        self.vocab_size = vocab_size
        self.device = device
        self.generator = generator
        self.eos_ids = list(eos_ids)
        self.penalties = PenaltyState(num_rows, vocab_size, device)
        self.grammar = GrammarMasker(vocab_size)

    @torch.inference_mode()
    def sample(self, reqs: list, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, V] fp32 (modified in place), ``hidden`` [B, H] → next ids [B] int64,
        on the device. A request's position counts its pending tokens (``generated_len``).
        Requests asking for logprobs or hidden states wait for the device here."""
        dev = logits.device
        lp_rows = [i for i, r in enumerate(reqs) if r.outputs is not None and r.outputs.return_logprob]
        raw_logprobs = torch.log_softmax(logits[lp_rows], dim=-1) if lp_rows else None

        if any(r.custom_logit_processor for r in reqs):
            logits = apply_processors(logits, reqs)
        self._apply_bias(logits, reqs)
        pen = [i for i, r in enumerate(reqs) if has_penalty(r.params)]
        pen_rows = None
        if pen:
            pen_reqs = [reqs[i] for i in pen]
            pen_rows = self.penalties.prepare(pen_reqs)
            col = [[r.params.frequency_penalty for r in pen_reqs],
                   [r.params.presence_penalty for r in pen_reqs],
                   [r.params.repetition_penalty for r in pen_reqs]]
            f, p, rp = to_device(col, logits.dtype, dev)[:, :, None]
            idx = to_device(pen, torch.int64, dev)
            logits[idx] = self.penalties.apply(logits[idx], pen_rows, f, p, rp)
        self.grammar.apply(logits, reqs)
        self._suppress_stop_tokens(logits, reqs)

        info = SamplingBatchInfo.build([r.params for r in reqs], logits.shape[-1], dev,
                                       [r.generated_len for r in reqs])
        next_ids = sample(logits, info, self.generator)

        if pen_rows is not None:
            self.penalties.record(pen_rows, next_ids[idx])
        if lp_rows:
            record_output([reqs[i] for i in lp_rows], raw_logprobs,
                          next_ids[torch.tensor(lp_rows, device=dev)])
        hs_rows = [i for i, r in enumerate(reqs) if r.outputs is not None and r.outputs.return_hidden_states
                   and r.output_ids and len(r.outputs.decode_hidden) < len(r.output_ids)]
        if hs_rows:
            rows = hidden[torch.tensor(hs_rows, device=hidden.device)].float().tolist()
            for i, h in zip(hs_rows, rows, strict=True):
                reqs[i].outputs.decode_hidden.append(h)
        return next_ids

    def after_append(self, req, token: int) -> None:
        """Advance per-request state once ``token`` is part of the output."""
        if req.grammar is not None and req.finished_reason is None:
            self.grammar.accept(req, token)

    def _apply_bias(self, logits: torch.Tensor, reqs: list) -> None:
        rows, cols, vals = [], [], []
        for i, r in enumerate(reqs):
            for tok, bias in (r.params.logit_bias or {}).items():
                t = int(tok)
                if 0 <= t < logits.shape[-1]:
                    rows.append(i)
                    cols.append(t)
                    vals.append(float(bias))
        if rows:
            dev = logits.device
            logits.index_put_((to_device(rows, torch.int64, dev), to_device(cols, torch.int64, dev)),
                              to_device(vals, logits.dtype, dev), accumulate=True)

    def _suppress_stop_tokens(self, logits: torch.Tensor, reqs: list) -> None:
        """Below ``min_new_tokens``, EOS and ``stop_token_ids`` cannot be sampled."""
        rows, cols = [], []
        for i, r in enumerate(reqs):
            if r.generated_len < r.params.min_new_tokens:
                for t in {*self.eos_ids, *r.params.stop_token_ids}:
                    if 0 <= t < logits.shape[-1]:
                        rows.append(i)
                        cols.append(t)
        if not rows:
            return
        dev = logits.device
        ri = to_device(rows, torch.int64, dev)
        ci = to_device(cols, torch.int64, dev)
        kept = logits[ri, ci].clone()
        # index_put_ with a device value: assigning a Python scalar syncs on CUDA.
        masked = torch.full_like(kept, float("-inf"))
        logits.index_put_((ri, ci), masked)
        # A grammar that allows only EOS here wins over min_new_tokens: rows left with no
        # token get theirs back (selected on the device; the host never looks).
        dead = torch.isneginf(logits[ri]).all(dim=-1)
        logits.index_put_((ri, ci), torch.where(dead, kept, masked))
