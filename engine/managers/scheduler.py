"""The scheduler process: continuous batching over one ModelRunner.

Each loop iteration: take new messages, pick one batch — a prefill/extend batch if any
waiting request can be admitted, else a decode step over the running requests — and
*launch* it (``engine/executor/step_executor.py`` runs forward and sampling on the device without
waiting), then *process* a launched step (ids to the host, stop checks, send to the detokenizer, free
finished requests).

KV invariant (enforced in ``_decode_batch`` and ``PrefillAdder``): every running request owns
KV slots for all of its tokens but the newest sampled one; a decode step needs one more slot
per request, and when the pool cannot give them even after evicting unlocked radix-cache
leaves, the newest requests are retracted to the waiting queue with their output so far
(nothing is lost: they re-prefill prompt + output and continue).

Overlap schedule (``disable_overlap_schedule``): a step is processed only after the next one
is launched, so the host's work on step N runs while the device computes step N+1. Request
state is then one step ahead of ``output_ids``: a launch advances ``kv_len`` and adds the
sampled token to ``Req.pending``; processing appends it. Decode input ids are gathered on
the device from the executor's ``last_token`` (in both modes), so a launch does not wait
for the step before.
- A request whose pending token reaches its length limit is left out of the next decode.
- One that stops on EOS or a stop string is found one step late: the token of the step
  already launched is dropped (never appended, sent or counted) and all its slots are freed.
- KV slots, table rows and ``last_token`` rows freed while a step is in flight may go to
  the next launch: all device work is on one stream, so the new owner's writes come after.
- The step in flight is processed first (``_sync``) when the next batch needs its results
  on the host: grammar, custom logit processor, logprobs or hidden states on a request with
  a pending token; a KV shortage (retraction re-prefills the complete output); flush_cache;
  shutdown; and when there is nothing to launch. Penalties and seeds need no sync: their
  counts live on the device, and positions count pending tokens (``Req.generated_len``).
Auto mode overlaps on CUDA with tp_size 1 only: on the CPU the host computes the step itself.
With tensor parallelism the leader no longer waits for the device (decode ids go to the
followers as a device broadcast, ``tp_worker``), and ``disable_overlap_schedule=False`` turns
overlap on; auto leaves it off until it has been measured on GPUs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from radixfleet.engine.config import EngineConfig
from radixfleet.engine.executor.cpu_threads import core_guard
from radixfleet.engine.executor.forward_batch import ForwardMode
from radixfleet.engine.executor.lora import load_adapter, unload_adapter
from radixfleet.engine.executor.model_runner import ModelRunner
from radixfleet.engine.executor.step_executor import SampledIds, StepExecutor
from radixfleet.engine.executor.tp_worker import TPLeader
from radixfleet.engine.executor.weight_update import weights_by_name
from radixfleet.engine.layers import distributed as dist
from radixfleet.engine.managers.io_struct import (
    AbortReq,
    BatchTokenOut,
    FlushCacheReq,
    GetInternalStateReq,
    GetWeightsByNameReq,
    KVEventsSnapshotReq,
    LoadLoRAAdapterReq,
    ReqError,
    ShutdownReq,
    TokenizedGenerateReq,
    UnloadLoRAAdapterReq,
    UpdateWeightsFromDiskReq,
)
from radixfleet.engine.managers.kv_manager import KVManager
from radixfleet.engine.managers.kv_publisher import KVEventPublisher, ReportArrivals
from radixfleet.engine.managers.prefill import SCHEDULE_POLICIES, PrefillAdder
from radixfleet.engine.managers.request import Req
from radixfleet.engine.managers.request_validation import validate_request
from radixfleet.engine.managers.scheduler_io import SchedulerIO, dispatch
from radixfleet.engine.managers.stop import StopChecker
from radixfleet.engine.memory.radix_cache import RadixCache
from radixfleet.engine.memory.transfer import to_device
from radixfleet.engine.sampling.grammar import GrammarBackend, GrammarQueue, grammar_key
from radixfleet.engine.sampling.logprobs import ReqOutputs
from radixfleet.engine.sampling.params import load_generation_defaults
from radixfleet.engine.sampling.pipeline import SamplingPipeline

logger = logging.getLogger(__name__)

_NEW_TOKEN_RATIO_INIT = 0.7
_NEW_TOKEN_RATIO_MIN = 0.1
_NEW_TOKEN_RATIO_DECAY = 0.001
_CPU_CHUNK = 2048
_GPU_CHUNK = 8192


@dataclass
class Launched:
    """A step queued on the device whose sampled ids are not yet appended."""

    reqs: list[Req]
    mode: ForwardMode
    sampled: list[Req]  # got a token (counted in their ``pending``), in ``ids`` order
    at_limit: list[Req]  # prefill done but already at their length limit: nothing sampled
    ids: SampledIds | None = None

    def tokens(self) -> list[int]:
        return [] if self.ids is None else self.ids.tolist()


def needs_host_state(req: Req) -> bool:
    """Whether sampling this request reads host state its previous token updates (grammar
    matcher, logprob / hidden-state lists), or runs client code (a custom logit processor)."""
    return req.grammar is not None or bool(req.custom_logit_processor) or req.outputs is not None


class Scheduler:
    def __init__(self, config: EngineConfig, runner: ModelRunner, io: SchedulerIO, model_path: str):
        """``runner``: the ModelRunner of TP rank 0 (or a stand-in with its interface);
        ``io``: the message channels (``scheduler_io``); ``model_path``: the model's folder,
        for its tokenizer (stop strings, grammars) and generation defaults."""
        self.config = config
        self.runner = runner
        self.io = io
        # Forward and LM-head calls; with TP they are announced to the follower ranks first.
        self.model = TPLeader(self.runner) if dist.tp_size() > 1 else self.runner
        self._stopping = False
        self.kv_events = None
        if config.kv_events_port and not config.disable_radix_cache:
            self.kv_events = KVEventPublisher(config.kv_events_host, config.kv_events_port,
                                              config.kv_events_block_size)
            # Requests are reported queued as they arrive, not when the scheduler next reads.
            self.io = ReportArrivals(io, self.kv_events, lambda m: isinstance(m, TokenizedGenerateReq))
        cache = RadixCache(self.runner.allocator, config.page_size, disabled=config.disable_radix_cache,
                           events=self.kv_events)
        self.kv = KVManager(self.runner.allocator, self.runner.req_table, cache, repoint_rows=dist.tp_size() == 1)
        self.stop_checker = StopChecker(config, model_path, self.runner.model_config)
        self.order = SCHEDULE_POLICIES[config.schedule_policy]
        chunk = config.chunked_prefill_size
        if chunk is None:
            chunk = _GPU_CHUNK if self.runner.device.type == "cuda" else _CPU_CHUNK
        self.chunk_size = config.max_prefill_tokens if chunk == -1 else chunk
        self.max_running = self.runner.max_running_requests
        choice = config.disable_overlap_schedule
        self.overlap = (self.runner.device.type == "cuda" and dist.tp_size() == 1) if choice is None else not choice
        self.core_guard = core_guard(self.runner.device.type)  # CPU: threads within the free cores
        self.in_flight: Launched | None = None
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
        self.executor = StepExecutor(self.model, self.runner.req_table, self.sampling, self.runner.device)
        self.generation_defaults = load_generation_defaults(model_path)
        # Requests wait here (not in ``waiting``) until their grammar is compiled.
        self.grammars = GrammarQueue(lambda: GrammarBackend(lambda: self.stop_checker.tokenizer, vocab))
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                      "retractions": 0, "decode_steps": 0, "extend_steps": 0,
                      "peak_running_requests": 0}
        self._recent: list[tuple[float, int]] = []  # (time, tokens) of recent decode steps
        # A weight update waits (holding new admissions) until no request is running.
        self._update: UpdateWeightsFromDiskReq | None = None
        self.weights_path = None if config.load_format == "dummy" else model_path
        self._handlers = {
            TokenizedGenerateReq: self._add_request, AbortReq: lambda msg: self._abort(msg.rid),
            ShutdownReq: self._shutdown, FlushCacheReq: self._flush_cache,
            GetInternalStateReq: self._internal_state, GetWeightsByNameReq: self._get_weights,
            UpdateWeightsFromDiskReq: self._queue_update, LoadLoRAAdapterReq: self._load_lora,
            UnloadLoRAAdapterReq: self._unload_lora, KVEventsSnapshotReq: self._kv_snapshot,
        }

    # ---- info ----------------------------------------------------------------------------
    def ready_info(self) -> dict:
        return {"max_total_tokens": self.runner.max_total_tokens,
                "max_running_requests": self.max_running,
                "context_length": self.runner.context_len,
                "vocab_size": self.runner.model_config.vocab_size,
                "device": str(self.runner.device), "dtype": str(self.runner.dtype).removeprefix("torch."),
                "kv_cache_dtype": str(self.runner.kv_dtype).removeprefix("torch."),
                "quantization": self.runner.quant.method if self.runner.quant else None,
                "chunked_prefill_size": self.chunk_size,
                "attention_backend": type(self.runner.attn_backend).__name__,
                "overlap_schedule": self.overlap,
                "eos_token_ids": list(self.runner.model_config.eos_token_ids)}

    def internal_state(self) -> dict:
        total = self.runner.max_total_tokens
        used = total - self.kv.allocator.available - self.kv.cache.evictable_size
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent if now - t < 10]
        span = now - recent[0][0] if len(recent) > 1 else 0
        prompt = max(self.stats["prompt_tokens"], 1)
        return {"num_running_requests": len(self.running) + (self.chunked is not None),
                # Requests waiting for their grammar to compile are queued too.
                "num_queued_requests": len(self.waiting) + len(self.grammars.pending),
                "kv_used_tokens": used, "kv_cache_usage_ratio": used / total,
                "radix_cache_tokens": self.kv.cache.total_size,
                "free_tokens": self.kv.allocator.available,
                "req_rows_free": self.kv.table.available,
                "cache_hit_ratio": self.stats["cached_tokens"] / prompt,
                "generation_throughput": sum(n for _, n in recent) / span if span else 0.0,
                "new_token_ratio": self.new_token_ratio,
                "cpu_threads": torch.get_num_threads(),  # on CPU: within the free cores (CoreGuard)
                **self.stats}

    # ---- loop ------------------------------------------------------------------------------
    def event_loop(self) -> None:
        """Serve until a ``shutdown`` call (or until the process is ended)."""
        while not self._stopping:
            # Never block with a step in flight: its tokens would wait for the next message.
            self._recv(block=not self._busy())
            if self._update is not None and not (self.running or self.chunked or self.in_flight):
                self._update_weights()
            if self.grammars.pending:
                self._admit_compiled()
            if self._busy() and not self._stopping:
                if self.core_guard is not None:
                    self.core_guard.tick()
                self.step()
            if self.kv_events is not None:
                self.kv_events.tick(self.kv.cache)
        if self.kv_events is not None:
            self.io.close()
            self.kv_events.close()

    def _busy(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self.in_flight)

    def _recv(self, block: bool) -> None:
        # While only grammars are compiling, look again soon.
        timeout = (5 if self.grammars.pending else 1000) if block else 0
        while not self._stopping and (msg := self.io.recv(timeout)) is not None:
            dispatch(self._handlers, msg, self.io)
            timeout = 0

    def _add_request(self, msg: TokenizedGenerateReq) -> None:
        error = validate_request(msg, self.runner, self.config, self.generation_defaults)
        if error:
            self.io.to_tokenizer(ReqError(msg.rid, error))
            if self.kv_events is not None:
                self.kv_events.settled([msg.rid])
            return
        opts = msg.options
        req = Req(msg.rid, list(msg.input_ids), msg.sampling_params,
                  stream=msg.stream, arrival_time=msg.arrival_time or time.monotonic(),
                  custom_logit_processor=opts.custom_logit_processor,
                  lora_id=self.runner.lora.index_of(opts.lora_path) if opts.lora_path else 0)
        if opts.return_logprob or opts.return_hidden_states:
            req.outputs = ReqOutputs(len(req.input_ids), opts.return_logprob, opts.logprob_start_len,
                                     opts.top_logprobs_num, opts.return_text_in_logprobs,
                                     opts.return_hidden_states, opts.token_ids_logprob)
        key = grammar_key(req.params)
        if key is not None:
            self.grammars.add(req, key)
        else:
            self.waiting.append(req)

    def _admit_compiled(self) -> None:
        ready, failed = self.grammars.take_ready()
        self.waiting.extend(ready)
        for req, message in failed:
            self.io.to_tokenizer(ReqError(req.rid, message))
        if failed and self.kv_events is not None:
            self.kv_events.settled(req.rid for req, _ in failed)

    # ---- control calls -------------------------------------------------------------------
    def _flush_cache(self, msg: FlushCacheReq) -> None:
        self._sync()
        busy = self.waiting or self.running or self.chunked
        ok = not busy and self.kv.cache.flush()
        self.io.to_tokenizer(msg.reply(ok, None if ok else "requests are in flight; flush refused"))

    def _kv_snapshot(self, msg: KVEventsSnapshotReq) -> None:
        if self.kv_events is None:
            self.io.to_tokenizer(msg.reply(error="KV events are off (start the engine with kv_events_port)"))
        else:
            self.io.to_tokenizer(msg.reply(self.kv_events.snapshot(self.kv.cache)))

    def _internal_state(self, msg: GetInternalStateReq) -> None:
        self.io.to_tokenizer(msg.reply(self.internal_state()))

    def _get_weights(self, msg: GetWeightsByNameReq) -> None:
        try:
            self.io.to_tokenizer(msg.reply(weights_by_name(self.runner.model, msg.name, msg.truncate_size)))
        except (ValueError, TypeError) as e:
            self.io.to_tokenizer(msg.reply(error=str(e)))

    def _load_lora(self, msg: LoadLoRAAdapterReq) -> None:
        self.io.to_tokenizer(msg.reply(load_adapter(self.runner.lora, msg.lora_name, msg.lora_path)))

    def _unload_lora(self, msg: UnloadLoRAAdapterReq) -> None:
        queued = [r for r, _ in self.grammars.pending]
        users = [*self.waiting, *self.running, *queued, *([self.chunked] if self.chunked else [])]
        self.io.to_tokenizer(msg.reply(unload_adapter(self.runner.lora, msg.lora_name, users)))

    def _queue_update(self, msg: UpdateWeightsFromDiskReq) -> None:
        if self._update is not None:
            self.io.to_tokenizer(msg.reply((False, "another weight update is in progress")))
        else:
            self._update = msg  # answered by _update_weights once nothing runs

    def _update_weights(self) -> None:
        """Swap in the weights of the pending update (nothing is running); answer its call."""
        msg, self._update = self._update, None
        ok, message = self.model.update_weights(msg.model_path, self.weights_path)
        if ok:
            self.weights_path = msg.model_path
            self.kv.cache.flush()  # its KV came from the old weights
        self.io.to_tokenizer(msg.reply((ok, message)))

    def _shutdown(self, msg: ShutdownReq) -> None:
        """Leave the event loop; TP followers (on any node) leave theirs too."""
        self._sync()
        if isinstance(self.model, TPLeader):
            self.model.stop()
        self._stopping = True

    def _abort(self, rid: str) -> None:
        """A request in the step in flight is released now; its pending token is dropped."""
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
        """Launch the next batch, then process the step before it (overlap: while the device
        runs the new one) — or, without overlap, the new one at once."""
        launched = self._launch_next()
        self._sync()
        self.in_flight = launched
        if not self.overlap:
            self._sync()

    def _sync(self) -> None:
        """Process the step in flight, if any."""
        launched, self.in_flight = self.in_flight, None
        if launched is not None:
            self._process(launched)

    def _launch_next(self) -> Launched | None:
        batch = self._prefill_batch()
        if batch:
            # Requests waiting for a prefill have nothing in flight: no need to sync.
            launched = self._launch(batch, ForwardMode.EXTEND)
        elif self.running and (batch := self._decode_batch()):
            launched = self._launch(batch, ForwardMode.DECODE)
        else:
            return None
        busy = len(self.running) + (self.chunked is not None)
        self.stats["peak_running_requests"] = max(self.stats["peak_running_requests"], busy)
        return launched

    def _prefill_batch(self) -> list[Req]:
        if (not self.waiting or self._update is not None) and self.chunked is None:
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

    def _decodable(self) -> list[Req]:
        """Running requests whose pending token (if any) is not their last."""
        return [r for r in self.running if not self.stop_checker.at_length_limit(r, r.generated_len)]

    def _decode_batch(self) -> list[Req]:
        reqs = self._decodable()
        if self.in_flight is not None and (self.kv.free_tokens < self.kv.decode_slots(reqs) or
                                           any(r.pending and needs_host_state(r) for r in reqs)):
            self._sync()
            reqs = self._decodable()
        if not reqs:  # every pending token is its request's last
            return []
        if self.kv.free_tokens < self.kv.decode_slots(reqs):
            assert self.in_flight is None, "retraction needs every output complete"
            while len(self.running) > 1 and self.kv.free_tokens < self.kv.decode_slots(self.running):
                self._retract(self.running.pop())
            if self.kv.free_tokens < self.kv.decode_slots(self.running):
                # A lone request that outgrew the whole KV pool cannot continue.
                self.running[0].finish("length", message="the KV cache is full")
                self._send(self.running)
                self._reap()
                return []
            reqs = list(self.running)
        for req in reqs:
            req.extend_len = 1
            slots = self.kv.extend(req, 1)
            assert slots is not None, "decode slots were checked above"
        self.new_token_ratio = max(self.new_token_ratio - _NEW_TOKEN_RATIO_DECAY, _NEW_TOKEN_RATIO_MIN)
        return reqs

    def _retract(self, req: Req) -> None:
        """Send a running request back to the queue; its output so far is kept."""
        assert req.pending == 0, "retracting a request with a token in flight"
        self.kv.release(req)
        req.retractions += 1
        self.stats["retractions"] += 1
        self.waiting.insert(0, req)
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.2)
        logger.info("retracted %s after %d tokens", req.rid, len(req.output_ids))

    def _launch(self, reqs: list[Req], mode: ForwardMode) -> Launched:
        """Queue the forward and the sampling of ``reqs`` on the device (``StepExecutor``)
        and advance their state by the launched step."""
        hidden, rows = self.executor.forward(reqs, mode)
        now = time.monotonic()
        for r in reqs:
            r.kv_len, r.extend_len = r.kv_len + r.extend_len, 0
            if r.first_scheduled_time is None:
                r.first_scheduled_time = now
        if mode is ForwardMode.EXTEND:
            self.stats["extend_steps"] += 1
            self.kv.cache_computed(reqs)  # requests admitted from the next step on reuse them
            if self.kv_events is not None:  # their prompts are now held (published as stored)
                self.kv_events.settled(r.rid for r in reqs if r.kv_len >= len(r.input_ids))
        launched = Launched(reqs, mode, [], [])
        keep = []  # batch indices of the requests that get a token
        for i, r in enumerate(reqs):
            if r.kv_len < r.total_len:
                continue  # still prefilling (chunked): no token this step
            if mode is ForwardMode.EXTEND and not r.output_ids:
                self.stats["prompt_tokens"] += len(r.input_ids)
                self.stats["cached_tokens"] += max(r.cached_tokens, 0)
            if self.stop_checker.at_length_limit(r, r.generated_len):
                launched.at_limit.append(r)
            else:
                keep.append(i)
                launched.sampled.append(r)
        if not keep:
            return launched
        if len(keep) < len(reqs):
            index = to_device(keep, torch.int64, hidden.device)
            hidden, rows = hidden[index], rows[index]
        launched.ids = self.executor.sample(launched.sampled, hidden, rows)
        for r in launched.sampled:
            r.pending += 1
        if mode is ForwardMode.EXTEND:
            # Joins the decode batch at once: its next step may launch before this one is processed.
            self.running += [r for r in launched.sampled if r not in self.running]
        return launched

    def _process(self, step: Launched) -> None:
        """Append a launched step's tokens, check stops, send, and free finished requests."""
        # Requests finished while the step ran (stopped in the step before, or aborted) were
        # sent and released already; their token from this step is dropped.
        live = [r for r in step.reqs if r.finished_reason is None]
        kept = 0
        for r, tok in zip(step.sampled, step.tokens(), strict=True):
            r.pending -= 1
            if r.finished_reason is not None:
                continue
            r.output_ids.append(tok)
            self.stop_checker.check(r)
            self.sampling.after_append(r, tok)
            kept += 1
        for r in step.at_limit:
            if r.finished_reason is None:
                r.finish("length")
        self.stats["generated_tokens"] += kept
        if step.mode is ForwardMode.DECODE and kept:
            now = time.monotonic()
            self.stats["decode_steps"] += 1
            self._recent = [(t, n) for t, n in self._recent if now - t < 10] + [(now, kept)]
        finished = [r for r in live if r.finished_reason is not None]
        self._send([r for r in live if r.finished_reason is None and r.stream
                    and len(r.output_ids) - r.sent_len >= self.config.stream_interval])
        self._reap(live)
        # Final answers go out after their KV is in the radix cache (and its KV events are
        # published): a client's next turn never reaches a router before the event does.
        self._send(finished)

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
        out = BatchTokenOut(
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
        self.io.to_detokenizer(out)
        if self.kv_events is not None:  # ended before its prefill (aborted, rejected): never held
            self.kv_events.settled(r.rid for r in reqs if r.finished_reason is not None)

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
