"""TokenizerManager: the engine's front in the caller's process.

Tokenizes and validates requests, sends them to the scheduler, and routes what comes back
(text deltas from the detokenizer, errors and control answers from the scheduler) to the
waiting caller. A background thread owns the receive socket; each request's results go to
a *sink*: a thread-safe queue for synchronous callers, or an asyncio queue on the caller's
own event loop. So the same manager serves a plain script, a running notebook loop, repeated
``asyncio.run`` calls and the HTTP server's loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from radixfleet.engine.managers import ipc, launch
from radixfleet.engine.managers.io_struct import (
    ENCODE_REFUSED,
    GENERATE_REFUSED,
    AbortReq,
    BatchTextOut,
    ControlReply,
    ControlReq,
    EmbeddingOut,
    EmbedReq,
    ReqError,
    ShutdownReq,
    SingleReq,
    TokenizedEmbeddingReq,
    TokenizedGenerateReq,
)
from radixfleet.engine.managers.session import SessionStore
from radixfleet.engine.models.model_prep import resolve_model_path
from radixfleet.engine.sampling.params import SamplingParams

logger = logging.getLogger(__name__)

_END = object()  # marks the end of a request's results in its sink
_LIST_META = ("input_token_logprobs", "input_top_logprobs", "output_token_logprobs",
              "output_top_logprobs", "input_token_ids_logprobs", "output_token_ids_logprobs",
              "hidden_states")


class ThreadSink:
    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()

    def put(self, item: Any) -> None:
        self.q.put(item)

    def get(self, timeout: float | None = None) -> Any:
        return self.q.get(timeout=timeout)


class AsyncSink:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.q: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.q.put_nowait, item)

    async def get(self) -> Any:
        return await self.q.get()


@dataclass
class ReqState:
    rid: str
    index: int  # position in the caller's batch (after expanding n)
    stream: bool
    sink: Any
    arrival: float
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    first_token_time: float | None = None
    hidden: bool = False  # internal prefill-only request of a parallel-sampling group
    then: list[TokenizedGenerateReq] = field(default_factory=list)  # sent when this ends
    then_states: list[ReqState] = field(default_factory=list)
    session: tuple[str, str | None, list[int]] | None = None  # (session id, parent turn, prompt)


class TokenizerManager:
    def __init__(self, tokenizer, ipc_names: dict[str, str], model_name: str):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.ctx = zmq.Context()
        self.recv_sock = ipc.bind_pull(self.ctx, ipc_names["tokenizer"])
        self.send_sock = ipc.connect_push(self.ctx, ipc_names["scheduler"])
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self.states: dict[str, ReqState] = {}
        self.rpc_waiters: dict[str, Any] = {}
        self.server_info: dict[str, Any] = {}
        self.context_length = 0
        self.vocab_size = 0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._procs: list = []
        self.listeners: list[Any] = []  # callables(state, out) for metrics; called on every output
        self.sessions = SessionStore()
        self.allow_auto_truncate = False  # EngineConfig.allow_auto_truncate

    # ---- start-up -------------------------------------------------------------------------
    def wait_ready(self, procs, timeout: float, need: set[str] = frozenset({"scheduler", "detokenizer"})) -> None:
        """Block until every process in ``need`` reports ready; raise with their error."""
        info = launch.wait_ready(self.recv_sock, set(need), procs, timeout)["scheduler"]["info"]
        self.server_info = info
        self.context_length = info["context_length"]
        self.vocab_size = info["vocab_size"]
        self._procs = list(procs)
        self._thread = threading.Thread(target=self._recv_loop, name="tokenizer-manager-recv", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.recv_sock.close(linger=0)
        self.send_sock.close(linger=0)
        self.ctx.term()

    # ---- sending --------------------------------------------------------------------------
    def _send(self, msg: Any) -> None:
        with self._send_lock:
            ipc.send(self.send_sock, msg)

    @property
    def is_embedding(self) -> bool:
        return bool(self.server_info.get("is_embedding"))

    def tokenize(self, req: SingleReq | EmbedReq) -> list[int]:
        if req.input_ids is not None:
            ids = req.input_ids
        else:
            if self.tokenizer is None:
                raise ValueError("this engine was started with skip_tokenizer_init: pass input_ids")
            ids = self.tokenizer.encode(req.text)
            if not ids:
                raise ValueError("the prompt is empty after tokenization")
        if any(not 0 <= t < self.vocab_size for t in ids):
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            raise ValueError(f"input_ids contain token id {bad} outside the vocabulary [0, {self.vocab_size})")
        # A generation prompt leaves room for one new token; an embedding input may fill it.
        limit = self.context_length - (not self.is_embedding)
        if len(ids) > limit:
            if not self.allow_auto_truncate:
                raise ValueError(f"the prompt has {len(ids)} tokens; the model's context length is "
                                 f"{self.context_length} (allow_auto_truncate cuts it instead)")
            logger.warning("prompt of %d tokens truncated to %d (allow_auto_truncate)", len(ids), limit)
            ids = ids[:limit]  # SGLang's choice: keep the start, drop the end
        params = getattr(req, "params", None)
        if params is not None and "max_new_tokens" in params.explicit and params.max_new_tokens is not None:
            self._fit_max_new_tokens(params, len(ids))
        return ids

    def _fit_max_new_tokens(self, params: SamplingParams, prompt_len: int) -> None:
        """An explicit ``max_new_tokens`` past the context is refused (SGLang's rule), or cut
        to what fits with ``allow_auto_truncate``."""
        room = self.context_length - prompt_len
        if params.max_new_tokens <= room:
            return
        if self.allow_auto_truncate:
            params.max_new_tokens = room
            params.min_new_tokens = min(params.min_new_tokens, room)
            return
        raise ValueError(f"the prompt has {prompt_len} tokens and max_new_tokens is {params.max_new_tokens}; "
                         f"together they exceed the model's context length of {self.context_length} "
                         "(lower max_new_tokens, or start the engine with allow_auto_truncate)")

    def weights_update_path(self, model_path: str, load_format: str | None) -> str:
        """The folder an ``update_weights_from_disk`` call loads; ValueError for a bad call."""
        if load_format not in (None, "auto", "safetensors"):
            raise ValueError(f"load_format must be auto or safetensors, got {load_format!r}")
        if self.is_embedding:
            raise ValueError("update_weights_from_disk is for generation models")
        return resolve_model_path(model_path)

    def _submit(self, reqs: list[SingleReq] | list[EmbedReq], sink) -> list[ReqState]:
        if reqs and isinstance(reqs[0], EmbedReq):
            return self.submit_embeddings(reqs, sink)
        return self.submit(reqs, sink)

    def submit_embeddings(self, reqs: list[EmbedReq], sink) -> list[ReqState]:
        """Tokenize and validate all, then send; each result is one ``EmbeddingOut`` row."""
        if not self.is_embedding:
            raise ValueError(ENCODE_REFUSED)
        tokenized = [self.tokenize(r) for r in reqs]
        now = time.monotonic()
        states = [ReqState(r.rid, i, False, sink, now) for i, r in enumerate(reqs)]
        with self._lock:
            for st in states:
                self.states[st.rid] = st
        for r, ids in zip(reqs, tokenized, strict=True):
            self._send(TokenizedEmbeddingReq(r.rid, ids, now))
        return states

    def submit(self, reqs: list[SingleReq], sink) -> list[ReqState]:
        """Tokenize, validate (all before sending any) and send; results go to ``sink``."""
        if self.is_embedding:
            raise ValueError(GENERATE_REFUSED)
        tokenized = [self.tokenize(r) for r in reqs]
        contexts = [self._session_context(r, ids) for r, ids in zip(reqs, tokenized, strict=True)]
        tokenized = [ids if c is None else c[2] for ids, c in zip(tokenized, contexts, strict=True)]
        now = time.monotonic()
        states, to_send = [], []
        for r, ids, context in zip(reqs, tokenized, contexts, strict=True):
            params = r.params
            if params.n == 1:
                msg = TokenizedGenerateReq(r.rid, ids, params, r.stream, now, r.options)
                states.append(ReqState(r.rid, len(states), r.stream, sink, now, session=context))
                to_send.append(msg)
                continue
            # Parallel sampling: prefill the prompt once (it lands in the radix cache), then
            # run the n samples, which reuse it.
            prefill = TokenizedGenerateReq(f"{r.rid}-prefill", ids,
                                           dataclasses.replace(params, max_new_tokens=0, n=1, min_new_tokens=0),
                                           r.stream, now, r.options)
            head = ReqState(prefill.rid, -1, False, sink, now, hidden=True)
            for k in range(params.n):
                sample_params = dataclasses.replace(params, n=1)
                if params.seed is not None:
                    sample_params.seed = params.seed + k
                rid = f"{r.rid}-{k}"
                head.then.append(TokenizedGenerateReq(rid, ids, sample_params, r.stream, now, r.options))
                st = ReqState(rid, len(states), r.stream, sink, now)
                head.then_states.append(st)
                states.append(st)
            to_send.append(prefill)
            with self._lock:
                self.states[head.rid] = head
        with self._lock:
            for st in states:
                self.states[st.rid] = st
        for msg in to_send:
            self._send(msg)
        return states

    def _session_context(self, req: SingleReq, ids: list[int]) -> tuple[str, str | None, list[int]] | None:
        """(session id, parent turn, whole prompt) of a request with ``session_params``."""
        if req.session_params is None:
            return None
        context = self.sessions.context(req.session_params, ids)
        if len(context[2]) >= self.context_length:
            raise ValueError(f"the session's context and this prompt have {len(context[2])} tokens; "
                             f"the model's context length is {self.context_length}")
        return context

    def abort(self, rid: str) -> None:
        self._send(AbortReq(rid))

    def request_shutdown(self) -> None:
        """Ask the scheduler to stop its TP followers and exit (no answer is awaited)."""
        self._send(ShutdownReq())

    # ---- receiving ------------------------------------------------------------------------
    def _recv_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.recv_sock, zmq.POLLIN)
        while not self._stopped.is_set():
            if not poller.poll(100):
                self._check_children()
                continue
            msg = ipc.recv(self.recv_sock)
            try:
                self._dispatch(msg)
            except Exception:
                logger.exception("failed to dispatch %s", type(msg).__name__)

    def _check_children(self) -> None:
        """If an engine process died, fail every pending request instead of hanging it."""
        dead = [p for p in self._procs if p.poll() is not None]
        if not dead or self._stopped.is_set():
            return
        with self._lock:
            states, self.states = list(self.states.values()), {}
        role = getattr(dead[0], "role", "child")
        err = RuntimeError(f"an engine process died (the {role}, exit code {dead[0].returncode}); restart the engine")
        for st in states:
            st.sink.put(err)
        self._procs = []  # report once

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, BatchTextOut):
            for i, rid in enumerate(msg.rids):
                with self._lock:
                    st = self.states.get(rid)
                if st is not None:
                    self._on_output(st, msg, i)
        elif isinstance(msg, EmbeddingOut):
            for i, rid in enumerate(msg.rids):
                with self._lock:
                    st = self.states.pop(rid, None)
                if st is not None:
                    self._on_embedding(st, msg, i)
        elif isinstance(msg, ReqError):
            with self._lock:
                st = self.states.pop(msg.rid, None)
            if st is not None:
                err = ValueError(msg.message)
                for s in [st, *st.then_states]:
                    self.states.pop(s.rid, None)
                    s.sink.put(err)
        elif isinstance(msg, ControlReply):
            waiter = self.rpc_waiters.pop(msg.call_id, None)
            if waiter is not None:
                waiter.put(msg)

    def _on_output(self, st: ReqState, msg: BatchTextOut, i: int) -> None:
        finished = msg.finished_reasons[i]
        new_ids = msg.new_token_ids[i]
        delta = msg.text_deltas[i]
        now = time.monotonic()
        if new_ids and st.first_token_time is None:
            st.first_token_time = now
        st.text += delta
        st.output_ids.extend(new_ids)
        for key, value in (msg.meta[i] or {}).items():
            if key in _LIST_META:  # logprobs and hidden states arrive as deltas
                st.meta.setdefault(key, []).extend(value)
            else:
                st.meta[key] = value
        meta = {"id": st.rid, "finish_reason": finished, "prompt_tokens": msg.prompt_tokens[i],
                "completion_tokens": msg.completion_tokens[i], "cached_tokens": msg.cached_tokens[i],
                **st.meta}
        if finished is not None:
            meta["e2e_latency"] = now - st.arrival
            with self._lock:
                self.states.pop(st.rid, None)
            if st.session is not None and finished["type"] != "abort":
                session_id, parent, prompt = st.session
                self.sessions.record(session_id, st.rid, parent, prompt, st.output_ids)
        if st.hidden:
            if finished is not None:
                if finished["type"] == "abort":
                    for s in st.then_states:
                        self.states.pop(s.rid, None)
                        s.sink.put(RuntimeError("request aborted"))
                for m in st.then:
                    self._send(m)
            return
        for listener in self.listeners:
            listener(st, new_ids, finished, meta)
        if st.stream:
            if delta or new_ids or finished is not None:
                st.sink.put((st.index, {"text": delta, "output_ids": list(new_ids), "meta_info": meta}))
        elif finished is not None:
            st.sink.put((st.index, {"text": st.text, "output_ids": st.output_ids, "meta_info": meta}))
        if finished is not None:
            st.sink.put((st.index, _END))

    def _on_embedding(self, st: ReqState, msg: EmbeddingOut, i: int) -> None:
        finished = {"type": "length", "length": 0}  # SGLang's reason for a finished embedding
        meta = {"id": st.rid, "finish_reason": finished, "prompt_tokens": msg.prompt_tokens[i],
                "completion_tokens": 0, "cached_tokens": 0, "queue_time": msg.queue_times[i],
                "e2e_latency": time.monotonic() - st.arrival}
        for listener in self.listeners:
            listener(st, [], finished, meta)
        st.sink.put((st.index, {"embedding": msg.embeddings[i], "meta_info": meta}))
        st.sink.put((st.index, _END))

    # ---- control calls --------------------------------------------------------------------
    def rpc_sync(self, req: ControlReq, timeout: float = 30.0) -> Any:
        """Send a control call; its reply's result (RuntimeError with its error)."""
        sink = ThreadSink()
        self.rpc_waiters[req.call_id] = sink
        self._send(req)
        return _result(sink.get(timeout=timeout))

    async def rpc(self, req: ControlReq) -> Any:
        """Awaitable ``rpc_sync`` (no timeout: the caller sets one)."""
        sink = AsyncSink()
        self.rpc_waiters[req.call_id] = sink
        self._send(req)
        return _result(await sink.get())

    # ---- high-level generation ------------------------------------------------------------
    def stream_sync(self, reqs: list[SingleReq]) -> Iterator[tuple[int, dict]]:
        """Yield (index, output) as results arrive; ends when every request has finished."""
        sink = ThreadSink()
        results = _Results(self, self._submit(reqs, sink))
        try:
            while results.pending:
                got = results.take(sink.get())
                if got is not None:
                    yield got
        finally:
            results.abort_unfinished()

    async def stream_async(self, reqs: list[SingleReq]) -> AsyncIterator[tuple[int, dict]]:
        """Async twin of ``stream_sync``; closing it early aborts the unfinished requests."""
        sink = AsyncSink()
        results = _Results(self, self._submit(reqs, sink))
        try:
            while results.pending:
                got = results.take(await sink.get())
                if got is not None:
                    yield got
        finally:
            results.abort_unfinished()


def _result(reply: ControlReply) -> Any:
    if reply.error:
        raise RuntimeError(reply.error)
    return reply.result


class _Results:
    """What the sync and async result loops share: counting finished requests, raising a
    request's error, and aborting what is unfinished when the caller stops early."""

    def __init__(self, tm: TokenizerManager, states: list[ReqState]):
        self.tm, self.states, self.pending = tm, states, len(states)

    def take(self, item: Any) -> tuple[int, dict] | None:
        if isinstance(item, Exception):
            self.pending -= 1
            raise item
        index, out = item
        if out is _END:
            self.pending -= 1
            return None
        return index, out

    def abort_unfinished(self) -> None:
        if self.pending:
            for st in self.states:
                if st.rid in self.tm.states:
                    self.tm.abort(st.rid)
