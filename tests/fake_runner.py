"""A Scheduler built in-process over a fake model runner and in-memory queues.

``FakeRunner`` has what the Scheduler uses of a ModelRunner, on the CPU: the real KV slot
allocator and req→token table (so KV accounting is real), and a model whose next token is
``next_token(context)``, a hash of every token before it. Its "KV cache" stores each slot's
token id, and the model reads its context back from the slots the scheduler recorded in the
table: a slot that is shared, freed too early or left unwritten changes the output.
``reference`` derives the expected output of a greedy request from the prompt alone.

``SchedulerHarness`` drives one scheduler step by step and records, in order, what it
launched (``Launch``) and what it sent to the detokenizer (``Sent``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from radixfleet.engine.config import EngineConfig
from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode
from radixfleet.engine.managers.io_struct import BatchTokenOut, TokenizedGenerateReq
from radixfleet.engine.managers.kv_publisher import ReportArrivals
from radixfleet.engine.managers.scheduler import Scheduler
from radixfleet.engine.managers.scheduler_io import QueueSchedulerIO
from radixfleet.engine.memory.allocator import TokenSlotAllocator
from radixfleet.engine.memory.req_table import ReqToTokenTable
from radixfleet.engine.models.model_config import ModelConfig
from radixfleet.engine.models.model_prep import resolve_model_path
from radixfleet.engine.sampling.params import SamplingParams

# Ids 17..110 of the default model's tokenizer are single ASCII characters; 2 is <|im_end|>.
VOCAB = 111
EOS = 2
CONTEXT_LEN = 256
_HASH_MOD = (1 << 61) - 1


def next_token(context: Sequence[int]) -> int:
    """The fake model: the token after ``context``, a hash of all of it."""
    h = 0
    for t in context:
        h = (h * 1_000_003 + t + 1) % _HASH_MOD
    return h % VOCAB


def reference(prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (EOS,)) -> list[int]:
    """Greedy output of the fake model: up to ``max_new_tokens``, through the first stop id."""
    context, out = list(prompt), []
    while len(out) < max_new_tokens:
        out.append(next_token(context))
        context.append(out[-1])
        if out[-1] in stop_ids:
            break
    return out


def prompt_stopping_at(step: int, length: int = 6) -> list[int]:
    """A prompt whose greedy output ends with EOS as its ``step``-th token."""
    for start in range(10_000):
        prompt = [17 + (start + 7 * i) % 94 for i in range(length)]
        if len(reference(prompt, step + 1)) == step:
            return prompt
    raise ValueError(f"no prompt of {length} tokens stops at step {step}")


class FakeRunner:
    """The ModelRunner interface the Scheduler uses, on the CPU. Hidden states are [N, 1]:
    the next token of each position's context; ``compute_logits`` makes it the argmax."""

    def __init__(self, max_total_tokens: int, max_running_requests: int, context_len: int = CONTEXT_LEN,
                 page_size: int = 1):
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.model_config = ModelConfig.from_dict({
            "architectures": ["FakeForCausalLM"], "vocab_size": VOCAB, "hidden_size": 1,
            "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
            "max_position_embeddings": context_len, "eos_token_id": EOS})
        self.context_len = context_len
        self.max_total_tokens = max_total_tokens
        self.max_running_requests = max_running_requests
        self.allocator = TokenSlotAllocator(max_total_tokens + page_size, page_size)  # page 0: padding
        self.req_table = ReqToTokenTable(max_running_requests + 1, context_len + 1, self.device)
        self.kv = torch.full((max_total_tokens + page_size,), -1, dtype=torch.int64)  # token id per slot
        self.lora = None
        self.attn_backend = None

    def forward(self, fb: ForwardBatch, sample_last_only: bool = True) -> torch.Tensor:
        """Store the new tokens' ids in their slots; for each new token, read its context
        back from the request's table row and return [next_token(context)]."""
        self.req_table.flush()
        self.kv[fb.out_cache_loc] = fb.input_ids
        hidden = []
        for row, start, end in zip(fb.req_pool_indices.tolist(), fb.extend_prefix_lens_cpu,
                                   fb.seq_lens_cpu, strict=True):
            context = self.kv[fb.req_to_token[row, :end].long()].tolist()
            assert -1 not in context, f"row {row} reads a KV slot nothing was written to"
            hidden += [next_token(context[:pos + 1]) for pos in range(start, end)]
        hidden = torch.tensor(hidden, dtype=torch.float32)[:, None]  # [T, 1]
        if fb.mode is ForwardMode.EXTEND and sample_last_only:
            hidden = fb.last_tokens(hidden)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, 1] → [B, VOCAB] fp32, one-hot at the model's next token."""
        logits = torch.zeros(hidden.shape[0], VOCAB, dtype=torch.float32)
        logits[torch.arange(hidden.shape[0]), hidden[:, 0].long()] = 1.0
        return logits


@dataclass(frozen=True)
class Launch:
    mode: str  # "extend" | "decode"
    rids: tuple[str, ...]


@dataclass(frozen=True)
class Sent:
    rid: str
    tokens: tuple[int, ...]
    finish: dict | None
    cached_tokens: int


class RecordingIO(QueueSchedulerIO):
    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events

    def to_detokenizer(self, msg: BatchTokenOut) -> None:
        super().to_detokenizer(msg)
        for i, rid in enumerate(msg.rids):
            self.events.append(Sent(rid, tuple(msg.new_token_ids[i]), msg.finished_reasons[i],
                                    msg.cached_tokens[i]))


class SchedulerHarness:
    """A Scheduler over a ``FakeRunner`` and ``RecordingIO``. ``events`` lists what it did,
    in order: ``Launch`` when a batch goes to the model, ``Sent`` per request output."""

    def __init__(self, overlap: bool, max_total_tokens: int = 4096, max_running_requests: int = 8,
                 **config):
        self.runner = FakeRunner(max_total_tokens, max_running_requests, page_size=config.get("page_size", 1))
        self.events: list[Launch | Sent] = []
        self.io = RecordingIO(self.events)
        model_path = resolve_model_path("smollm2")  # its tokenizer, for stop strings
        cfg = EngineConfig(model_path=model_path, device="cpu", context_length=CONTEXT_LEN,
                           max_total_tokens=max_total_tokens, max_running_requests=max_running_requests,
                           disable_overlap_schedule=not overlap, random_seed=0, **config)
        self.scheduler = Scheduler(cfg, self.runner, self.io, model_path)
        assert self.scheduler.overlap is overlap
        launch = self.scheduler.executor.forward

        def record_launch(reqs, mode):
            self.events.append(Launch(mode.value, tuple(r.rid for r in reqs)))
            return launch(reqs, mode)

        self.scheduler.executor.forward = record_launch
        self._arrivals = itertools.count(1)
        self._submitted = 0

    def submit(self, rid: str, prompt: Sequence[int], stream: bool = False, **params) -> None:
        """Queue a greedy request (``params``: sampling parameters); it arrives after the
        ones submitted before it and is received at the next ``step``."""
        sampling = SamplingParams.from_dict({"temperature": 0, **params})
        self.io.inbox.put(TokenizedGenerateReq(rid, list(prompt), sampling, stream=stream,
                                               arrival_time=float(next(self._arrivals))))
        self._submitted += 1

    def step(self) -> None:
        """One event-loop iteration: take new messages, then launch / process a step."""
        io = self.scheduler.io
        if isinstance(io, ReportArrivals):  # KV events on: a reader thread hands requests on
            deadline = time.monotonic() + 5
            while io.received < self._submitted:
                assert time.monotonic() < deadline, "the arrivals thread did not hand the requests on"
                time.sleep(0.001)
        self.scheduler._recv(block=False)
        if self.scheduler._busy():
            self.scheduler.step()

    def run(self, max_steps: int = 10_000) -> None:
        """Step until nothing is queued, running or in flight."""
        self.step()
        for _ in range(max_steps):
            if not self.scheduler._busy():
                return
            self.step()
        raise AssertionError(f"still busy after {max_steps} steps")

    # ---- what a user would see ----------------------------------------------------------
    def sent(self, rid: str) -> list[Sent]:
        return [e for e in self.events if isinstance(e, Sent) and e.rid == rid]

    def tokens(self, rid: str) -> list[int]:
        """Every token sent for ``rid``, in order."""
        return [t for e in self.sent(rid) for t in e.tokens]

    def finish(self, rid: str) -> dict | None:
        """The finish reason sent for ``rid``; nothing is sent for it after that."""
        sent = self.sent(rid)
        finished = [i for i, e in enumerate(sent) if e.finish is not None]
        assert len(finished) <= 1, f"{rid} finished {len(finished)} times"
        assert not finished or finished[0] == len(sent) - 1, f"{rid} got output after its finish"
        return sent[-1].finish if finished else None

    def launches(self, mode: str | None = None) -> list[Launch]:
        return [e for e in self.events if isinstance(e, Launch) and (mode is None or e.mode == mode)]

    def assert_all_free(self) -> None:
        """Nothing runs, and once the radix cache is flushed every KV slot and table row is free."""
        s = self.scheduler
        assert not (s.waiting or s.running or s.chunked or s.in_flight)
        assert s.kv.cache.flush()
        assert self.runner.allocator.available == self.runner.max_total_tokens
        assert self.runner.req_table.available == self.runner.max_running_requests + 1
