"""The detokenizer process: token ids → incremental text, with stop strings handled.

Per request it decodes only a short window of recent ids (the "surrogate" window keeps
multi-token characters and leading-space rules right), and while a request runs it holds
back any text tail that could still grow into a stop string, so a stop string never
reaches the user unless ``no_stop_trim`` asks for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import zmq

from radixfleet.engine.managers import ipc
from radixfleet.engine.managers.io_struct import BatchTextOut, BatchTokenOut
from radixfleet.engine.sampling.logprobs import fill_texts

logger = logging.getLogger(__name__)


@dataclass
class DecodeState:
    ids: list[int] = field(default_factory=list)
    surr_offset: int = 0
    read_offset: int = 0
    text: str = ""  # all text decoded so far
    sent: int = 0  # characters of ``text`` already sent


def holdback_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-k:]):
                best = k
                break
    return best


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, DecodeState] = {}

    def _decode(self, ids: list[int], skip: bool, spaces: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip,
                                     spaces_between_special_tokens=spaces)

    def update(self, rid: str, new_ids: list[int], finished: dict | None, skip: bool,
               spaces: bool, no_stop_trim: bool, stops: list[str]) -> str:
        """Feed new ids; return the text delta to send now."""
        st = self.states.setdefault(rid, DecodeState())
        st.ids.extend(new_ids)
        ids = st.ids
        if finished and isinstance(finished.get("matched"), int) and not no_stop_trim and ids:
            ids = ids[:-1]  # the matched stop token is not part of the text
        if len(ids) > st.read_offset:
            surr = self._decode(ids[st.surr_offset:st.read_offset], skip, spaces)
            full = self._decode(ids[st.surr_offset:], skip, spaces)
            if len(full) > len(surr) and (finished or not full.endswith("\ufffd")):
                st.text += full[len(surr):]
                st.surr_offset, st.read_offset = st.read_offset, len(ids)
        if finished:
            self.states.pop(rid, None)
            text = st.text
            matched = finished.get("matched")
            if isinstance(matched, str) and not no_stop_trim:
                cut = text.find(matched, max(st.sent - len(matched), 0))
                if cut >= 0:
                    text = text[:cut]
            return text[st.sent:]
        end = len(st.text) - (holdback_len(st.text, stops) if stops and not no_stop_trim else 0)
        if end <= st.sent:
            return ""
        delta, st.sent = st.text[st.sent:end], end
        return delta


def run_detokenizer(tokenizer_path: str, trust_remote_code: bool, ipc_names: dict[str, str],
                    skip_tokenizer_init: bool) -> None:
    tokenizer = None
    if not skip_tokenizer_init:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
    detok = IncrementalDetokenizer(tokenizer)
    ctx = zmq.Context()
    recv_sock = ipc.bind_pull(ctx, ipc_names["detokenizer"])
    send_sock = ipc.connect_push(ctx, ipc_names["tokenizer"])
    while True:
        msg: BatchTokenOut = ipc.recv(recv_sock)
        deltas = []
        for i, rid in enumerate(msg.rids):
            if tokenizer is None:
                deltas.append("")
                continue
            deltas.append(detok.update(rid, msg.new_token_ids[i], msg.finished_reasons[i],
                                       msg.skip_special_tokens[i], msg.spaces_between_special_tokens[i],
                                       msg.no_stop_trim[i], msg.stop_strs[i]))
        for meta in msg.meta:
            if meta:
                fill_texts(meta, (lambda ids: tokenizer.batch_decode([[t] for t in ids]))
                           if tokenizer is not None else (lambda ids: [None] * len(ids)))
        ipc.send(send_sock, BatchTextOut(
            rids=msg.rids, text_deltas=deltas, new_token_ids=msg.new_token_ids,
            finished_reasons=msg.finished_reasons, prompt_tokens=msg.prompt_tokens,
            completion_tokens=msg.completion_tokens, cached_tokens=msg.cached_tokens, meta=msg.meta))
