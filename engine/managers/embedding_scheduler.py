"""EmbeddingScheduler: the scheduler process of an embedding model (BERT encoders, and
decoders without an LM head or with ``is_embedding``: ``models/decoder_embedding.py``).

An embedding request is one bidirectional forward over its prompt and then done, so there
is no KV cache, no radix tree and no decode: each step takes waiting requests in arrival
order while the padded batch (requests × longest prompt) stays within
``max_prefill_tokens``, runs the forward, and sends the pooled vectors straight back to the
TokenizerManager (there is no text to detokenize).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque

from radixfleet.engine.config import EngineConfig
from radixfleet.engine.executor.model_runner import (
    build_model,
    iter_safetensors,
    randomize,
    resolve_device,
    resolve_dtype,
)
from radixfleet.engine.managers.io_struct import (
    GENERATE_REFUSED,
    AbortReq,
    EmbeddingOut,
    FlushCacheReq,
    GetInternalStateReq,
    ReqError,
    ShutdownReq,
    TokenizedEmbeddingReq,
    TokenizedGenerateReq,
)
from radixfleet.engine.managers.scheduler_io import SchedulerIO, dispatch
from radixfleet.engine.models.bert import Pooling
from radixfleet.engine.models.decoder_embedding import DEFAULT_POOLING, DecoderEmbeddingModel
from radixfleet.engine.models.embedding_options import folder_options
from radixfleet.engine.models.model_config import ModelConfig
from radixfleet.engine.models.registry import decoder_class, embedding_model_class

logger = logging.getLogger(__name__)

class EmbeddingScheduler:
    def __init__(self, config: EngineConfig, model_path: str, io: SchedulerIO):
        self.config = config
        self.model_config = ModelConfig.from_path(model_path)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device)
        self.context_len = min(config.context_length or self.model_config.max_position_embeddings,
                               self.model_config.max_position_embeddings)
        arch = self.model_config.architecture
        cls = embedding_model_class(arch, True)
        decoder = cls is DecoderEmbeddingModel
        if decoder:
            cls = functools.partial(DecoderEmbeddingModel, decoder=decoder_class(arch))
        self.pooling = Pooling.from_folder(model_path, DEFAULT_POOLING if decoder else Pooling())
        self.options = folder_options(model_path, self.model_config.hf)
        self.model = build_model(cls, self.model_config, self.device, self.dtype)
        if decoder:
            self.model.attention_backend = config.attention_backend
        if config.load_format == "dummy":
            randomize(self.model)
        else:
            self.model.load_weights(iter_safetensors(model_path))
        self.model.eval()
        self.budget = config.max_prefill_tokens
        self.waiting: deque[TokenizedEmbeddingReq] = deque()
        self.stats = {"prompt_tokens": 0, "embedded_requests": 0, "forward_steps": 0}
        self._stopping = False
        self.io = io
        self._handlers = {
            TokenizedEmbeddingReq: self._add_request, AbortReq: self._abort,
            TokenizedGenerateReq: lambda msg: self.io.to_tokenizer(ReqError(msg.rid, GENERATE_REFUSED)),
            ShutdownReq: self._stop,
            FlushCacheReq: lambda msg: self.io.to_tokenizer(msg.reply(True)),  # nothing is cached
            GetInternalStateReq: lambda msg: self.io.to_tokenizer(msg.reply(self.internal_state())),
        }
        logger.info("embedding model %s on %s (%s), pooling %s", self.model_config.architecture,
                    self.device, self.dtype, self.pooling)

    def ready_info(self) -> dict:
        return {"is_embedding": True, "context_length": self.context_len,
                "vocab_size": self.model_config.vocab_size, "embedding_dim": self.model_config.hidden_size,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "pooling": self.pooling.mode, "normalize": self.pooling.normalize, **self.options,
                "max_total_tokens": 0, "max_running_requests": 0, "eos_token_ids": []}

    def internal_state(self) -> dict:
        return {"num_running_requests": 0, "num_queued_requests": len(self.waiting),
                "kv_cache_usage_ratio": 0.0, "cache_hit_ratio": 0.0, "generation_throughput": 0.0,
                **self.stats}

    def event_loop(self) -> None:
        while not self._stopping:
            self._recv(block=not self.waiting)
            if self.waiting:
                self.step()

    def _recv(self, block: bool) -> None:
        timeout = 1000 if block else 0
        while not self._stopping and (msg := self.io.recv(timeout)) is not None:
            dispatch(self._handlers, msg, self.io)
            timeout = 0

    def _add_request(self, msg: TokenizedEmbeddingReq) -> None:
        error = self._validate(msg.input_ids)
        if error:
            self.io.to_tokenizer(ReqError(msg.rid, error))
        else:
            self.waiting.append(msg)

    def _stop(self, msg: ShutdownReq) -> None:
        self._stopping = True

    def _abort(self, msg: AbortReq) -> None:
        keep: deque[TokenizedEmbeddingReq] = deque()
        for r in self.waiting:
            if msg.rid and r.rid != msg.rid:
                keep.append(r)
            else:  # ends the request's state in the TokenizerManager
                self.io.to_tokenizer(ReqError(r.rid, "request aborted"))
        self.waiting = keep

    def _validate(self, ids: list[int]) -> str | None:
        if not ids:
            return "the input is empty"
        if len(ids) > self.context_len:
            return f"the input has {len(ids)} tokens; the model's context length is {self.context_len}"
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            return f"input_ids contain token ids outside the vocabulary [0, {vocab})"
        return None

    def _take_batch(self) -> list[TokenizedEmbeddingReq]:
        """Arrival order, while requests × longest prompt fits the token budget (at least one)."""
        batch: list[TokenizedEmbeddingReq] = []
        longest = 0
        while self.waiting:
            n = max(longest, len(self.waiting[0].input_ids))
            if batch and n * (len(batch) + 1) > self.budget:
                break
            batch.append(self.waiting.popleft())
            longest = n
        return batch

    def step(self) -> None:
        batch = self._take_batch()
        now = time.monotonic()
        vectors = self.model.embed([r.input_ids for r in batch], self.pooling).cpu().tolist()
        self.stats["forward_steps"] += 1
        self.stats["embedded_requests"] += len(batch)
        self.stats["prompt_tokens"] += sum(len(r.input_ids) for r in batch)
        self.io.to_tokenizer(EmbeddingOut(
            [r.rid for r in batch], vectors, [len(r.input_ids) for r in batch],
            [max(now - r.arrival_time, 0.0) if r.arrival_time else 0.0 for r in batch]))
