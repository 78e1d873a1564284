"""The scheduler process: continuous batching over one ModelRunner.

Each loop iteration: take new messages, pick one batch — a prefill/extend batch if any
waiting request can be admitted, else a decode step over the running requests — run it,
sample, and send the new tokens to the detokenizer.

Invariant (enforced in ``_decode_batch`` and ``PrefillAdder``): every running request owns
KV slots for all of its tokens but the last sampled one; a decode step needs one more slot
per request, and when the pool cannot give them even after evicting unlocked radix-cache
leaves, the newest requests are retracted to the waiting queue with their output so far
(nothing is lost: they re-prefill prompt + output and continue).
"""

from __future__ import annotations

import logging
import time

import torch
import zmq

from radixfleet.engine import distributed as dist
from radixfleet.engine import ipc
from radixfleet.engine.attention.base import ForwardBatch, ForwardMode
from radixfleet.engine.config import EngineConfig
from radixfleet.engine.grammar import GrammarBackend, GrammarQueue, grammar_key
from radixfleet.engine.kv_manager import KVManager
from radixfleet.engine.memory.radix_cache import RadixCache
from radixfleet.engine.model_runner import ModelRunner
from radixfleet.engine.prefill import SCHEDULE_POLICIES, PrefillAdder
from radixfleet.engine.request import Req
from radixfleet.engine.sampling.custom_logit_processor import load_processor
from radixfleet.engine.sampling.logprobs import ReqOutputs
from radixfleet.engine.sampling.params import load_generation_defaults
from radixfleet.engine.sampling.pipeline import SamplingPipeline
from radixfleet.engine.stop import StopChecker
from radixfleet.engine.tp_worker import TPLeader

logger = logging.getLogger(__name__)

_NEW_TOKEN_RATIO_INIT = 0.7
_NEW_TOKEN_RATIO_MIN = 0.1
_NEW_TOKEN_RATIO_DECAY = 0.001
_CPU_CHUNK = 2048
_GPU_CHUNK = 8192


class Scheduler:
    def __init__(self, config: EngineConfig, model_path: str, ipc_names: dict[str, str]):
        self.config = config
        self.runner = ModelRunner(config, model_path)
        # Forward and LM-head calls; with TP they are announced to the follower ranks first.
        self.model = TPLeader(self.runner) if dist.tp_size() > 1 else self.runner
        self._stopping = False
        cache = RadixCache(self.runner.allocator, config.page_size, disabled=config.disable_radix_cache)
        self.kv = KVManager(self.runner.allocator, self.runner.req_table, cache)
        self.stop_checker = StopChecker(config, model_path, self.runner.model_config)
        self.order = SCHEDULE_POLICIES[config.schedule_policy]
        chunk = config.chunked_prefill_size
        if chunk is None:
            chunk = _GPU_CHUNK if self.runner.device.type == "cuda" else _CPU_CHUNK
        self.chunk_size = config.max_prefill_tokens if chunk == -1 else chunk
        self.max_running = self.runner.max_running_requests
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Req | None = None  # a request part-way through its prefill
        self.new_token_ratio = _NEW_TOKEN_RATIO_INIT * config.schedule_conservativeness
        self.generator = torch.Generator(device=self.runner.device)
        if config.random_seed is not None:
            self.generator.manual_seed(config.random_seed)
        else:
            self.generator.seed()
        vocab = self.runner.model_config.vocab_size
        self.sampling = SamplingPipeline(vocab, self.max_running + 1, self.runner.device, self.generator,
                                         self.runner.model_config.eos_token_ids)
        self.generation_defaults = load_generation_defaults(model_path)
        # Requests wait here (not in ``waiting``) until their grammar is compiled.
        self.grammars = GrammarQueue(lambda: GrammarBackend(lambda: self.stop_checker.tokenizer, vocab))
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                      "retractions": 0, "decode_steps": 0}
        self._recent: list[tuple[float, int]] = []  # (time, tokens) of recent decode steps
        ctx = zmq.Context()
        self.recv_sock = ipc.bind_pull(ctx, ipc_names["scheduler"])
        self.detok_sock = ipc.connect_push(ctx, ipc_names["detokenizer"])
        self.reply_sock = ipc.connect_push(ctx, ipc_names["tokenizer"])
        self.poller = zmq.Poller()
        self.poller.register(self.recv_sock, zmq.POLLIN)

    # ---- info ----------------------------------------------------------------------------
    def ready_info(self) -> dict:
        return {"max_total_tokens": self.runner.max_total_tokens,
                "max_running_requests": self.max_running,
                "context_length": self.runner.context_len,
                "vocab_size": self.runner.model_config.vocab_size,
                "device": str(self.runner.device), "dtype": str(self.runner.dtype).removeprefix("torch."),
                "chunked_prefill_size": self.chunk_size,
                "attention_backend": type(self.runner.attn_backend).__name__,
                "eos_token_ids": list(self.runner.model_config.eos_token_ids)}

    def internal_state(self) -> dict:
        total = self.runner.max_total_tokens
        used = total - self.kv.allocator.available - self.kv.cache.evictable_size
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent if now - t < 10]
        span = now - recent[0][0] if len(recent) > 1 else 0
        prompt = max(self.stats["prompt_tokens"], 1)
        return {"num_running_requests": len(self.running) + (self.chunked is not None),
                "num_queued_requests": len(self.waiting),
                "kv_used_tokens": used, "kv_cache_usage_ratio": used / total,
                "radix_cache_tokens": self.kv.cache.total_size,
                "free_tokens": self.kv.allocator.available,
                "cache_hit_ratio": self.stats["cached_tokens"] / prompt,
                "generation_throughput": sum(n for _, n in recent) / span if span else 0.0,
                "new_token_ratio": self.new_token_ratio, **self.stats}

    # ---- loop ------------------------------------------------------------------------------
    def event_loop(self) -> None:
        """Serve until a ``shutdown`` call (or until the process is ended)."""
        while not self._stopping:
            busy = bool(self.waiting or self.running or self.chunked)
            self._recv(block=not busy)
            if self.grammars.pending:
                self._admit_compiled()
            if self.waiting or self.running or self.chunked:
                self.step()

    def _recv(self, block: bool) -> None:
        # While only grammars are compiling, look again soon.
        timeout = (5 if self.grammars.pending else 1000) if block else 0
        while not self._stopping and self.poller.poll(timeout):
            self._handle(ipc.recv(self.recv_sock))
            timeout = 0

    def _handle(self, msg) -> None:
        if isinstance(msg, ipc.TokenizedGenerateReq):
            error = self._validate(msg)
            if error:
                ipc.send(self.reply_sock, ipc.ReqError(msg.rid, error))
                return
            req = Req(msg.rid, list(msg.input_ids), msg.sampling_params,
                      stream=msg.stream, arrival_time=msg.arrival_time or time.monotonic(),
                      custom_logit_processor=msg.custom_logit_processor)
            if msg.return_logprob or msg.return_hidden_states:
                req.outputs = ReqOutputs(len(req.input_ids), msg.return_logprob, msg.logprob_start_len,
                                         msg.top_logprobs_num, msg.return_text_in_logprobs,
                                         msg.return_hidden_states)
            key = grammar_key(req.params)
            if key is not None:
                self.grammars.add(req, key)
            else:
                self.waiting.append(req)
        elif isinstance(msg, ipc.AbortReq):
            self._abort(msg.rid)
        elif isinstance(msg, ipc.RpcReq) and msg.method == "shutdown":
            self._shutdown()
        elif isinstance(msg, ipc.RpcReq):
            ipc.send(self.reply_sock, self._rpc(msg))
        else:
            logger.error("scheduler got an unknown message %r", type(msg).__name__)

    def _validate(self, msg: ipc.TokenizedGenerateReq) -> str | None:
        n, ctx = len(msg.input_ids), self.runner.context_len
        if n == 0:
            return "the prompt is empty"
        if n >= ctx:
            return f"the prompt has {n} tokens; the context length is {ctx}"
        if n > self.runner.max_total_tokens - 1:
            return f"the prompt has {n} tokens; the KV cache holds {self.runner.max_total_tokens}"
        vocab = self.runner.model_config.vocab_size
        if any(not 0 <= t < vocab for t in msg.input_ids):
            return f"input_ids contain token ids outside the vocabulary [0, {vocab})"
        return self._validate_sampling(msg)

    def _validate_sampling(self, msg: ipc.TokenizedGenerateReq) -> str | None:
        params = msg.sampling_params
        try:
            params.apply_defaults(self.generation_defaults)
        except ValueError as e:
            return str(e)
        if msg.custom_logit_processor:
            if not self.config.enable_custom_logit_processor:
                return ("custom_logit_processor is disabled; start the engine with "
                        "enable_custom_logit_processor=True to accept it (it runs client code)")
            try:
                load_processor(msg.custom_logit_processor)
            except ValueError as e:
                return str(e)
        if grammar_key(params) is not None and self.config.skip_tokenizer_init:
            return "json_schema, regex and ebnf need the tokenizer (skip_tokenizer_init is set)"
        return None

    def _admit_compiled(self) -> None:
        ready, failed = self.grammars.take_ready()
        self.waiting.extend(ready)
        for req, message in failed:
            ipc.send(self.reply_sock, ipc.ReqError(req.rid, message))

    def _rpc(self, msg: ipc.RpcReq) -> ipc.RpcReply:
        if msg.method == "flush_cache":
            busy = self.waiting or self.running or self.chunked
            ok = not busy and self.kv.cache.flush()
            return ipc.RpcReply(msg.call_id, ok, None if ok else "requests are in flight; flush refused")
        if msg.method == "get_internal_state":
            return ipc.RpcReply(msg.call_id, self.internal_state())
        return ipc.RpcReply(msg.call_id, error=f"unknown method {msg.method!r}")

    def _shutdown(self) -> None:
        """Leave the event loop; TP followers (on any node) leave theirs too."""
        if isinstance(self.model, TPLeader):
            self.model.stop()
        self._stopping = True

    def _abort(self, rid: str) -> None:
        for req in self.grammars.remove(rid):
            req.finish("abort", message="aborted")
            self._send([req])
        for req in list(self.waiting):
            if not rid or req.rid == rid:
                self.waiting.remove(req)
                req.finish("abort", message="aborted")
                self._send([req])
        for req in self.running + ([self.chunked] if self.chunked else []):
            if (not rid or req.rid == rid) and req.finished_reason is None:
                req.finish("abort", message="aborted")
        self._reap()

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> None:
        batch = self._prefill_batch()
        if batch:
            self._run(batch, ForwardMode.EXTEND)
        elif self.running:
            batch = self._decode_batch()
            if batch:
                self._run(batch, ForwardMode.DECODE)

    def _prefill_batch(self) -> list[Req]:
        if not self.waiting and self.chunked is None:
            return []
        adder = PrefillAdder(self.kv, self.running, self.chunk_size, self.max_running, self.new_token_ratio)
        if self.chunked is not None:
            if not adder.add(self.chunked, continuing=True):
                return adder.batch
            self.chunked = None
        for req in self.order(self.waiting, self.kv):
            done = adder.add(req)
            if req in adder.batch:
                self.waiting.remove(req)
                if not done:
                    self.chunked = req
                    break
            if not done:
                break
        return adder.batch

    def _decode_batch(self) -> list[Req]:
        while len(self.running) > 1 and self.kv.free_tokens < len(self.running):
            self._retract(self.running.pop())
        if self.kv.free_tokens < len(self.running):
            # A lone request that outgrew the whole KV pool cannot continue.
            self.running[0].finish("length", message="the KV cache is full")
            self._send(self.running)
            self._reap()
            return []
        for req in self.running:
            req.extend_len = 1
            slots = self.kv.extend(req, 1)
            assert slots is not None, "decode slots were checked above"
        self.new_token_ratio = max(self.new_token_ratio - _NEW_TOKEN_RATIO_DECAY, _NEW_TOKEN_RATIO_MIN)
        return list(self.running)

    def _retract(self, req: Req) -> None:
        """Send a running request back to the queue; its output so far is kept."""
        self.kv.release(req)
        req.retractions += 1
        self.stats["retractions"] += 1
        self.waiting.insert(0, req)
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.2)
        logger.info("retracted %s after %d tokens", req.rid, len(req.output_ids))

    def _forward_batch(self, reqs: list[Req], mode: ForwardMode) -> ForwardBatch:
        dev = self.runner.device
        ids, pos, locs = [], [], []
        req_table = self.kv.table
        host = req_table.host
        for r in reqs:
            fill = r.fill_ids
            ids += fill[r.kv_len:r.kv_len + r.extend_len]
            pos += range(r.kv_len, r.kv_len + r.extend_len)
        rows = torch.tensor([r.row for r in reqs], dtype=torch.int64)
        for r in reqs:
            locs.append(host[r.row, r.kv_len:r.kv_len + r.extend_len])
        seq = [r.kv_len + r.extend_len for r in reqs]
        prefix = [r.kv_len for r in reqs]
        ext = [r.extend_len for r in reqs]

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype, device=dev)

        return ForwardBatch(mode=mode, input_ids=t(ids, torch.int64), positions=t(pos, torch.int64),
                            req_pool_indices=rows.to(dev), seq_lens=t(seq, torch.int32),
                            extend_prefix_lens=t(prefix, torch.int32), extend_seq_lens=t(ext, torch.int32),
                            out_cache_loc=torch.cat(locs).to(dev, torch.int64), req_to_token=req_table.table,
                            seq_lens_cpu=seq, extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=ext)

    def _run(self, reqs: list[Req], mode: ForwardMode) -> None:
        fb = self._forward_batch(reqs, mode)
        want_prompt = [r.outputs is not None and not r.outputs.prompt_done for r in reqs]
        if mode is ForwardMode.EXTEND and any(want_prompt):
            # Logprobs / hidden states of prompt positions: keep every new token's state.
            hidden = self.model.forward(fb, sample_last_only=False)
            ends = torch.tensor(fb.extend_seq_lens_cpu).cumsum(0)
            for r, want, end in zip(reqs, want_prompt, ends.tolist(), strict=True):
                if want:
                    r.outputs.collect_prompt(hidden[end - r.extend_len:end], r.kv_len, r.input_ids,
                                             self.model.compute_logits)
            hidden = hidden[(ends - 1).to(hidden.device)]
        else:
            hidden = self.model.forward(fb)
        now = time.monotonic()
        for r in reqs:
            r.kv_len += r.extend_len
            r.extend_len = 0
            if r.first_scheduled_time is None:
                r.first_scheduled_time = now
        # Requests still prefilling (chunked) produce no token this step.
        ready = [i for i, r in enumerate(reqs) if r.kv_len == len(r.fill_ids)]
        if mode is ForwardMode.EXTEND:
            for r in reqs:
                if r.kv_len == len(r.fill_ids) and not r.output_ids:
                    self.stats["prompt_tokens"] += len(r.input_ids)
                    self.stats["cached_tokens"] += max(r.cached_tokens, 0)
        sampled = [reqs[i] for i in ready if reqs[i].remaining_new_tokens > 0]
        if sampled:
            idx = torch.tensor([i for i in ready if reqs[i].remaining_new_tokens > 0], device=hidden.device)
            logits = self.model.compute_logits(hidden[idx])
            next_ids = self.sampling.sample(sampled, logits, hidden[idx])
            for r, tok in zip(sampled, next_ids, strict=True):
                r.output_ids.append(tok)
                self.stop_checker.check(r)
                self.sampling.after_append(r, tok)
            self.stats["generated_tokens"] += len(sampled)
        for i in ready:
            r = reqs[i]
            if r.remaining_new_tokens == 0 and r.finished_reason is None:
                r.finish("length")
            if mode is ForwardMode.EXTEND and r.finished_reason is None and r not in self.running:
                self.running.append(r)
        if mode is ForwardMode.DECODE:
            self.stats["decode_steps"] += 1
            self._recent = [(t, n) for t, n in self._recent if now - t < 10] + [(now, len(sampled))]
        self._send([r for r in reqs if r.finished_reason is not None or
                    (r.stream and len(r.output_ids) - r.sent_len >= self.config.stream_interval)])
        self._reap(reqs)

    def _reap(self, batch: list[Req] = ()) -> None:
        """Free finished requests (including aborted ones) and drop them from the batch.

        ``batch``: the step's requests; one that finished in its prefill step never joined
        ``running`` and must be released here too (else its table row and slots leak)."""
        done = [r for r in self.running if r.finished_reason is not None]
        done += [r for r in batch if r.finished_reason is not None and r not in done and r is not self.chunked]
        if self.chunked is not None and self.chunked.finished_reason is not None:
            done.append(self.chunked)
            self.chunked = None
        for r in done:
            if r in self.running:
                self.running.remove(r)
            self.kv.release(r)
            if r.finished_reason and r.finished_reason["type"] == "abort":
                self._send([r])

    def _send(self, reqs: list[Req]) -> None:
        reqs = [r for r in reqs if r.sent_len < len(r.output_ids) or r.finished_reason is not None]
        if not reqs:
            return
        out = ipc.BatchTokenOut(
            rids=[r.rid for r in reqs],
            new_token_ids=[r.output_ids[r.sent_len:] for r in reqs],
            finished_reasons=[r.finished_reason for r in reqs],
            prompt_tokens=[len(r.input_ids) for r in reqs],
            completion_tokens=[len(r.output_ids) for r in reqs],
            cached_tokens=[max(r.cached_tokens, 0) for r in reqs],
            skip_special_tokens=[r.params.skip_special_tokens for r in reqs],
            spaces_between_special_tokens=[r.params.spaces_between_special_tokens for r in reqs],
            no_stop_trim=[r.params.no_stop_trim for r in reqs],
            stop_strs=[r.params.stop_strs for r in reqs],
            meta=[self._meta(r) for r in reqs],
        )
        for r in reqs:
            r.sent_len = len(r.output_ids)
        ipc.send(self.detok_sock, out)

    @staticmethod
    def _meta(r: Req) -> dict:
        meta = {}
        if r.first_scheduled_time is not None:
            meta["queue_time"] = max(r.first_scheduled_time - r.arrival_time, 0.0)
        if r.retractions:
            meta["retractions"] = r.retractions
        if r.outputs is not None:
            meta.update(r.outputs.meta_delta(r.sent_len))
        return meta
