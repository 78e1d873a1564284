"""Logprobs and hidden states a request asked for, and how they reach ``meta_info``.

Logprobs are of the raw model distribution: ``log_softmax`` of the logits before any
temperature, penalty, bias, grammar mask or custom processor. That is SGLang's default
(its logits processor computes them from the model output, ahead of the sampler), and it
is what makes them comparable with a plain HF forward.

Entries are SGLang's tuples ``(logprob, token_id, text-or-None)``; the scheduler sends
``None`` for text and the detokenizer fills it when ``return_text_in_logprobs`` is set.
Input entry ``i`` is ``log p(prompt[i] | prompt[:i])`` for ``i >= logprob_start_len``
(``None`` for ``i == 0``); ``logprob_start_len = -1`` means the last prompt token only.
``token_ids_logprob`` (SGLang's name) adds, at the same positions, the logprobs of those
token ids whatever was chosen: ``input_token_ids_logprobs`` / ``output_token_ids_logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_ROWS_PER_CHUNK = 256  # prompt positions turned into logits at once (bounds memory)
TEXT_FLAG = "_logprob_text"  # meta key asking the detokenizer for token texts

LOGPROB_KEYS = ("input_token_logprobs", "input_top_logprobs", "output_token_logprobs",
                "output_top_logprobs", "input_token_ids_logprobs", "output_token_ids_logprobs")
# Keys whose entries are lists of tuples (one list per position), not single tuples.
_NESTED_KEYS = ("input_top_logprobs", "output_top_logprobs", "input_token_ids_logprobs",
                "output_token_ids_logprobs")


@dataclass
class ReqOutputs:
    """Per-request extras beyond tokens; ``None`` on requests that asked for none."""

    prompt_len: int
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    return_hidden_states: bool = False
    token_ids_logprob: list[int] | None = None
    input_token_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    output_token_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    input_token_ids_logprobs: list = field(default_factory=list)
    output_token_ids_logprobs: list = field(default_factory=list)
    prompt_hidden: list = field(default_factory=list)  # [L][H] floats
    decode_hidden: list = field(default_factory=list)  # one [H] per decode step
    prompt_done: bool = False  # every prompt position asked for has been collected
    input_sent: bool = False
    hidden_sent: int = 0

    def __post_init__(self) -> None:
        if self.logprob_start_len < 0 or self.logprob_start_len >= self.prompt_len:
            self.logprob_start_len = self.prompt_len - 1
        if not (self.return_logprob or self.return_hidden_states):
            self.prompt_done = True

    @property
    def first_position(self) -> int:
        """The first prompt position whose hidden state is needed."""
        if self.return_hidden_states:
            return 0
        return max(self.logprob_start_len - 1, 0)

    def prefix_limit(self) -> int | None:
        """Most tokens the radix cache may supply (the rest must be computed)."""
        return None if self.prompt_done else self.first_position

    def collect_prompt(self, hidden: torch.Tensor, start: int, input_ids: list[int],
                       compute_logits) -> None:
        """``hidden`` [n, H]: final hidden states of prompt-or-later positions start..start+n."""
        if self.prompt_done:
            return
        end = min(start + hidden.shape[0], self.prompt_len)
        if self.return_hidden_states and start < end:
            self.prompt_hidden.extend(hidden[: end - start].float().tolist())
        if self.return_logprob:
            if start <= 0 < end and self.logprob_start_len == 0:
                self.input_token_logprobs.append((None, input_ids[0], None))
                if self.top_logprobs_num:
                    self.input_top_logprobs.append(None)
                if self.token_ids_logprob:
                    self.input_token_ids_logprobs.append(None)
            # Position p predicts prompt token p + 1; wanted for p + 1 in [lo, L).
            lo = max(start, self.logprob_start_len - 1, 0)
            hi = min(end, self.prompt_len - 1)
            for c in range(lo, hi, _ROWS_PER_CHUNK):
                c_end = min(c + _ROWS_PER_CHUNK, hi)
                lp = torch.log_softmax(compute_logits(hidden[c - start:c_end - start]).float(), dim=-1)
                targets = input_ids[c + 1:c_end + 1]
                tgt = torch.tensor(targets, device=lp.device)
                vals = lp.gather(1, tgt[:, None]).squeeze(1).tolist()
                self.input_token_logprobs.extend((v, t, None) for v, t in zip(vals, targets, strict=True))
                if self.top_logprobs_num:
                    self.input_top_logprobs.extend(top_entries(lp, self.top_logprobs_num))
                if self.token_ids_logprob:
                    self.input_token_ids_logprobs.extend(id_entries(lp, self.token_ids_logprob))
        if end >= self.prompt_len:
            self.prompt_done = True

    def meta_delta(self, sent_len: int) -> dict:
        """What to add to the user's meta_info since the last message."""
        meta: dict = {}
        if self.return_logprob:
            if self.prompt_done and not self.input_sent:
                meta["input_token_logprobs"] = self.input_token_logprobs
                meta["input_top_logprobs"] = self.input_top_logprobs
                if self.token_ids_logprob:
                    meta["input_token_ids_logprobs"] = self.input_token_ids_logprobs
                self.input_sent = True
            meta["output_token_logprobs"] = self.output_token_logprobs[sent_len:]
            meta["output_top_logprobs"] = self.output_top_logprobs[sent_len:]
            if self.token_ids_logprob:
                meta["output_token_ids_logprobs"] = self.output_token_ids_logprobs[sent_len:]
            if self.return_text_in_logprobs:
                meta[TEXT_FLAG] = True
        if self.return_hidden_states:
            blocks = ([self.prompt_hidden] if self.prompt_hidden else []) + self.decode_hidden
            meta["hidden_states"] = blocks[self.hidden_sent:]
            self.hidden_sent = len(blocks)
        return meta


def top_entries(lp: torch.Tensor, k: int) -> list[list[tuple]]:
    """lp [N, V] → per row the k best (logprob, token_id, None), best first."""
    vals, ids = lp.topk(k, dim=-1)
    return [[(v, t, None) for v, t in zip(vr, ir, strict=True)] for vr, ir in zip(vals.tolist(), ids.tolist(), strict=True)]


def id_entries(lp: torch.Tensor, token_ids: list[int]) -> list[list[tuple]]:
    """lp [N, V] → per row (logprob, token_id, None) for each of ``token_ids``, in that order."""
    vals = lp[:, torch.tensor(token_ids, device=lp.device)].tolist()
    return [[(v, t, None) for v, t in zip(row, token_ids, strict=True)] for row in vals]


def record_output(reqs: list, logprobs: torch.Tensor, next_ids: torch.Tensor) -> None:
    """``logprobs`` [B, V] raw log-softmax of the rows of ``reqs`` that asked for logprobs."""
    vals = logprobs.gather(1, next_ids[:, None]).squeeze(1).tolist()
    k = max(r.outputs.top_logprobs_num for r in reqs)
    tops = top_entries(logprobs, k) if k else None
    for i, (r, v, t) in enumerate(zip(reqs, vals, next_ids.tolist(), strict=True)):
        out = r.outputs
        out.output_token_logprobs.append((v, t, None))
        if out.top_logprobs_num:
            out.output_top_logprobs.append(tops[i][: out.top_logprobs_num])
        if out.token_ids_logprob:
            out.output_token_ids_logprobs.extend(id_entries(logprobs[i:i + 1], out.token_ids_logprob))


def fill_texts(meta: dict, decode) -> None:
    """Detokenizer side: put token texts into the tuples when the request asked for them."""
    if not meta.pop(TEXT_FLAG, False):
        return
    ids = []
    for key in LOGPROB_KEYS:
        for entry in meta.get(key) or []:
            if entry is None:
                continue
            if key in _NESTED_KEYS:
                ids.extend(t for _, t, _ in entry)
            else:
                ids.append(entry[1])
    if not ids:
        return
    texts = dict(zip(ids, decode(ids), strict=True))
    for key in LOGPROB_KEYS:
        if key not in meta:
            continue
        if key in _NESTED_KEYS:
            meta[key] = [None if e is None else [(v, t, texts[t]) for v, t, _ in e] for e in meta[key]]
        else:
            meta[key] = [(v, t, texts[t]) for v, t, _ in meta[key]]
