"""``Engine``: SGLang's offline Python API over the three-process engine.

With ``tp_size > 1`` the scheduler side is one process per TP rank (rank 0 schedules, the
others follow it; see ``tp_worker``). An engine with ``node_rank > 0`` runs only its node's
ranks: it serves nothing, and ``generate`` on it raises.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import zmq

from radixfleet import env_vars
from radixfleet.engine.config import EngineConfig
from radixfleet.engine.managers import ipc, launch
from radixfleet.engine.managers.io_struct import (
    FlushCacheReq,
    GenerateReqInput,
    GetInternalStateReq,
    GetWeightsByNameReq,
    KVEventsSnapshotReq,
    LoadLoRAAdapterReq,
    UnloadLoRAAdapterReq,
    UpdateWeightsFromDiskReq,
    normalize_encode,
)
from radixfleet.engine.managers.local_paths import LocalPathPolicy
from radixfleet.engine.managers.scoring import (
    SCORE_SAMPLING,
    ScoreResult,
    score_prompts,
    score_result,
)
from radixfleet.engine.managers.tokenizer_manager import TokenizerManager
from radixfleet.engine.models import embedding_options
from radixfleet.engine.models.model_config import ModelConfig
from radixfleet.engine.models.model_prep import resolve_model_path
from radixfleet.engine.models.registry import embedding_model_class, get_model_class

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = env_vars.START_TIMEOUT.get()
_UPDATE_TIMEOUT_S = 600.0  # a weight update waits for the running requests to finish
_STOP_GRACE_S = 5.0  # how long rank 0 gets to stop its TP followers before it is terminated


def _load_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


class Engine:
    """The inference engine. ``Engine(model_path=..., **engine_args)``; see ``EngineConfig``."""

    def __init__(self, **kwargs: Any):
        self.config = EngineConfig.from_kwargs(**kwargs)
        logging.getLogger("radixfleet").setLevel(self.config.log_level_int)
        if self.config.device.startswith("cuda"):  # refuse here, before any download or process
            from radixfleet.engine.executor.model_runner import check_cuda_device

            check_cuda_device(self.config.device)
        self.model_path = self._local_folder(self.config.model_path, self.config.revision,
                                             weights=self.config.load_format != "dummy")
        if not os.path.isdir(self.model_path):
            raise ValueError(f"model_path {self.config.model_path!r} is not a folder (nor a known alias, "
                             "nor a Hub repo id org/name)")
        if self.config.tokenizer_path:  # the tokenizer's processes then read a local folder too
            self.config = self.config.replace(tokenizer_path=self.model_path
                                              if self.config.tokenizer_path == self.config.model_path
                                              else self._local_folder(self.config.tokenizer_path))
        if self.config.tp_size > 1 or self.config.is_embedding:
            model = ModelConfig.from_path(self.model_path)
            if embedding_model_class(model.architecture, self.config.is_embedding):
                if self.config.tp_size > 1:
                    raise ValueError(f"{model.architecture} as an embedding model runs on one device "
                                     "(tp_size 1)")
            elif self.config.is_embedding:
                get_model_class(model.architecture)  # ValueError naming the supported ones
            else:
                check_tensor_parallel(self.config, model)
        self.local_paths = LocalPathPolicy.for_engine(
            self.model_path, self.config.lora_paths or (), self.config.allowed_local_paths or ())
        self._procs: list = []
        self.tokenizer_manager: TokenizerManager | None = None
        names = ipc.new_ipc_names()
        try:
            if self.config.node_rank == 0:
                self._start_serving_node(names)
            else:
                self._start_worker_node(names)
        except BaseException:
            self.shutdown()
            raise
        self._finalizer = weakref.finalize(self, launch.terminate, list(self._procs))
        atexit.register(self.shutdown)

    def _local_folder(self, path: str, revision: str | None = None, weights: bool = False) -> str:
        """An alias, local folder or Hub repo id as a local folder (a Hub repo is downloaded
        into ``download_dir``; ``weights=False`` fetches only its config and tokenizer files)."""
        return resolve_model_path(path, revision, self.config.download_dir, weights=weights)

    def _start_serving_node(self, names: dict[str, str]) -> None:
        """Node 0: tokenizer manager here, a detokenizer, and this node's TP ranks (rank 0 schedules)."""
        tokenizer_path = self.config.tokenizer_path or self.model_path
        tokenizer = None if self.config.skip_tokenizer_init else _load_tokenizer(
            tokenizer_path, self.config.trust_remote_code)
        self.tokenizer_manager = TokenizerManager(
            tokenizer, names, self.config.served_model_name or self.config.model_path)
        self.tokenizer_manager.allow_auto_truncate = self.config.allow_auto_truncate
        self._procs.append(launch.spawn("detokenizer", {
            "tokenizer_path": tokenizer_path, "trust_remote_code": self.config.trust_remote_code,
            "ipc_names": names, "skip_tokenizer_init": self.config.skip_tokenizer_init,
        }, self.config.log_level))
        ranks = self._spawn_ranks(names)
        self.tokenizer_manager.wait_ready(self._procs, _START_TIMEOUT_S,
                                          {"detokenizer", *(launch.rank_role(r) for r in ranks)})

    def _start_worker_node(self, names: dict[str, str]) -> None:
        """Node > 0 of a multi-node TP group: only this node's ranks, which follow rank 0."""
        ctx = zmq.Context()
        sock = ipc.bind_pull(ctx, names["tokenizer"])
        try:
            ranks = self._spawn_ranks(names)
            launch.wait_ready(sock, {launch.rank_role(r) for r in ranks}, self._procs, _START_TIMEOUT_S)
        finally:
            sock.close(linger=0)
            ctx.term()

    def _spawn_ranks(self, names: dict[str, str]) -> list[int]:
        """Start this node's scheduler-side TP ranks; return their global ranks."""
        cfg = self.config
        per_node = cfg.tp_size // cfg.nnodes
        init_method = None
        if cfg.tp_size > 1:
            init_method = f"tcp://{cfg.dist_init_addr or f'127.0.0.1:{launch.free_port()}'}"
        ranks = [cfg.node_rank * per_node + local for local in range(per_node)]
        for local, rank in enumerate(ranks):
            self._procs.append(launch.spawn("scheduler" if rank == 0 else "tp_follower", {
                "config": cfg, "model_path": self.model_path, "ipc_names": names, "rank": rank,
                "local_rank": local, "init_method": init_method,
            }, cfg.log_level))
        return ranks

    # ---- generation ------------------------------------------------------------------------
    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None,
                 **options: Any) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (returns a dict) or a batch (returns a list of dicts).
        ``options``: the other fields of ``GenerateReqInput`` (``stream``, ``rid``,
        ``return_logprob``, ``lora_path``, ...); any other name is a ValueError.

        With ``stream=True`` returns an iterator of chunks whose ``text`` is the new text.
        """
        reqs, is_batch, stream, tm = self._prepare(prompt, sampling_params, input_ids, options)
        if stream:
            return self._iter_stream(tm.stream_sync(reqs), is_batch)
        results = dict(tm.stream_sync(reqs))
        return _shape([results[i] for i in range(len(results))], is_batch)

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: dict | list[dict] | None = None,
                             input_ids: list[int] | list[list[int]] | None = None,
                             **options: Any) -> dict | list[dict] | AsyncIterator[dict]:
        """Awaitable ``generate``; with ``stream=True`` it returns an async iterator of chunks."""
        reqs, is_batch, stream, tm = self._prepare(prompt, sampling_params, input_ids, options)
        if stream:
            return self._aiter_stream(tm.stream_async(reqs), is_batch)
        results = {i: out async for i, out in tm.stream_async(reqs)}
        return _shape([results[i] for i in range(len(results))], is_batch)

    def _prepare(self, prompt, sampling_params, input_ids, options: dict[str, Any]):
        """Validate one generate call (both flavours); return (requests, is_batch, stream, manager)."""
        req = GenerateReqInput.from_kwargs(options, text=prompt, input_ids=input_ids,
                                           sampling_params=sampling_params)
        reqs, is_batch = req.normalize()
        return reqs, is_batch, bool(req.stream), self._tm()

    # ---- scoring ---------------------------------------------------------------------------
    def score(self, query: str | list[int] | None = None, items: str | list[str] | list[list[int]] | None = None,
              label_token_ids: list[int] | None = None, apply_softmax: bool = False,
              item_first: bool = False) -> ScoreResult:
        """Probabilities of ``label_token_ids`` right after each (query + item) prompt:
        ``result.scores[i][j]`` for item i and label j (see ``engine/managers/scoring.py``)."""
        texts, ids = score_prompts(query, items, label_token_ids, item_first)
        outs = self.generate(texts, [dict(SCORE_SAMPLING) for _ in texts or ids], input_ids=ids,
                             return_logprob=True, token_ids_logprob=label_token_ids)
        return score_result(outs, label_token_ids, apply_softmax)

    async def async_score(self, query: str | list[int] | None = None,
                          items: str | list[str] | list[list[int]] | None = None,
                          label_token_ids: list[int] | None = None, apply_softmax: bool = False,
                          item_first: bool = False) -> ScoreResult:
        """Awaitable ``score``."""
        texts, ids = score_prompts(query, items, label_token_ids, item_first)
        outs = await self.async_generate(texts, [dict(SCORE_SAMPLING) for _ in texts or ids], input_ids=ids,
                                         return_logprob=True, token_ids_logprob=label_token_ids)
        return score_result(outs, label_token_ids, apply_softmax)

    # ---- embeddings ----------------------------------------------------------------------
    def encode(self, prompt: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None,
               rid: str | list[str] | None = None, dimensions: int | None = None,
               prompt_name: str | None = None, **unsupported: Any) -> dict | list[dict]:
        """Embed one input (returns ``{"embedding": [...], "meta_info": {...}}``) or a batch
        (a list of such dicts). Needs an embedding model. ``prompt_name``: one of the model's
        instruction prefixes (``models/embedding_options.py``); ``dimensions``: a reduced size,
        for models that allow it (truncated and renormalised)."""
        reqs, is_batch, dims = self._prepare_encode(prompt, input_ids, rid, dimensions, prompt_name,
                                                    unsupported)
        results = dict(self._tm().stream_sync(reqs))
        return _shape([self._reduced(results[i], dims) for i in range(len(results))], is_batch)

    async def async_encode(self, prompt: str | list[str] | None = None,
                           input_ids: list[int] | list[list[int]] | None = None,
                           rid: str | list[str] | None = None, dimensions: int | None = None,
                           prompt_name: str | None = None, **unsupported: Any) -> dict | list[dict]:
        """Awaitable ``encode``."""
        reqs, is_batch, dims = self._prepare_encode(prompt, input_ids, rid, dimensions, prompt_name,
                                                    unsupported)
        results = {i: out async for i, out in self._tm().stream_async(reqs)}
        return _shape([self._reduced(results[i], dims) for i in range(len(results))], is_batch)

    def _prepare_encode(self, prompt, input_ids, rid, dimensions, prompt_name, unsupported: dict[str, Any]):
        if unsupported:
            raise ValueError(f"unsupported encode argument(s): {', '.join(sorted(unsupported))}")
        info = self._tm().server_info
        dims = embedding_options.check_dimensions(info, dimensions)
        if isinstance(prompt, str):
            prompt = embedding_options.apply_prompt(info, [prompt], prompt_name)[0]
        else:
            prompt = embedding_options.apply_prompt(info, prompt, prompt_name)
        return (*normalize_encode(prompt, input_ids, rid), dims)

    def _reduced(self, out: dict, dims: int | None) -> dict:
        if dims is None:
            return out
        normalize = bool(self._tm().server_info.get("normalize"))
        return {**out, "embedding": embedding_options.truncate(out["embedding"], dims, normalize)}

    @staticmethod
    def _iter_stream(it: Iterator[tuple[int, dict]], is_batch: bool) -> Iterator[dict]:
        for index, out in it:
            yield {**out, "index": index} if is_batch else out

    @staticmethod
    async def _aiter_stream(it: AsyncIterator[tuple[int, dict]], is_batch: bool) -> AsyncIterator[dict]:
        async for index, out in it:
            yield {**out, "index": index} if is_batch else out

    # ---- control -----------------------------------------------------------------------------
    def flush_cache(self) -> bool:
        """Drop the radix cache; False (nothing dropped) while requests are in flight."""
        try:
            return bool(self._tm().rpc_sync(FlushCacheReq()))
        except RuntimeError:
            return False

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None) -> tuple[bool, str]:
        """Swap in the weights of another folder of the same architecture and shapes (a new
        checkpoint of this model). Waits for the running requests to finish and holds new ones
        meanwhile; flushes the radix cache. Returns (success, message); on failure the old
        weights stay in use. A folder outside the allowed ones (``local_paths.py``) is a
        ``ValueError``."""
        tm = self._tm()
        path = tm.weights_update_path(self.local_paths.check(model_path, "model_path"), load_format)
        ok, message = tm.rpc_sync(UpdateWeightsFromDiskReq(path), timeout=_UPDATE_TIMEOUT_S)
        if ok:
            self.model_path = path
        return bool(ok), message

    def open_session(self, capacity_of_str_len: int, session_id: str | None = None, streaming: bool = False,
                     timeout: float | None = None) -> str:
        """Open a multi-turn session (``engine/managers/session.py``); returns its id. Requests then
        continue from its turns with ``session_params={"id": ...}``."""
        return self._tm().sessions.open(capacity_of_str_len, session_id, streaming, timeout)

    def close_session(self, session_id: str) -> None:
        self._tm().sessions.close(session_id)

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> tuple[bool, str]:
        """Load a peft LoRA folder as adapter ``lora_name`` (needs ``enable_lora``); requests
        then name it in ``lora_path``. Returns (success, message); a folder outside the allowed
        ones (``local_paths.py``) is a ``ValueError``."""
        lora_path = self.local_paths.check(lora_path, "lora_path")
        return tuple(self._tm().rpc_sync(LoadLoRAAdapterReq(lora_name, lora_path), timeout=120))

    def unload_lora_adapter(self, lora_name: str) -> tuple[bool, str]:
        """Drop adapter ``lora_name``; refused while a request uses it."""
        return tuple(self._tm().rpc_sync(UnloadLoRAAdapterReq(lora_name)))

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[float]:
        """The first ``truncate_size`` values of a parameter (rank 0's shard), by this engine's
        parameter name (``layers.0.self_attn.qkv_proj.weight``; a leading ``model.`` is ignored)."""
        try:
            return self._tm().rpc_sync(GetWeightsByNameReq(name, truncate_size))
        except RuntimeError as e:
            raise ValueError(str(e)) from None

    def get_server_info(self) -> dict:
        tm = self._tm()
        info = {f: getattr(self.config, f) for f in self.config.__dataclass_fields__}
        info.update(tm.server_info)
        info["model_path"] = self.model_path
        info["internal_states"] = [tm.rpc_sync(GetInternalStateReq())]
        return info

    def kv_events_snapshot(self) -> dict:
        """Every resident KV-event block and the current ``seq`` (``radixfleet/kv_events.py``);
        a ``RuntimeError`` when KV events are off (``kv_events_port`` 0)."""
        return self._tm().rpc_sync(KVEventsSnapshotReq())

    def abort_request(self, rid: str = "") -> None:
        self._tm().abort(rid)

    def _tm(self) -> TokenizerManager:
        if self.tokenizer_manager is None:
            raise RuntimeError(f"this engine is node_rank {self.config.node_rank} of a {self.config.nnodes}-node "
                               "tensor-parallel group: it only runs model shards; send requests to the "
                               "engine with node_rank 0")
        if not self._procs:
            raise RuntimeError("the engine has been shut down")
        dead = [p for p in self._procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"an engine process died (exit code {dead[0].returncode}); restart the engine")
        return self.tokenizer_manager

    # ---- lifetime ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """End every child process and release the IPC sockets. Safe to call twice."""
        procs, self._procs = self._procs, []
        if procs:
            scheduler = next((p for p in procs if getattr(p, "role", None) == "scheduler"), None)
            if self.config.tp_size > 1 and self.tokenizer_manager is not None and scheduler is not None \
                    and scheduler.poll() is None:
                # Rank 0 tells every follower (other nodes' too) to stop before it exits.
                self.tokenizer_manager.request_shutdown()
                launch.wait_exit([scheduler], _STOP_GRACE_S)
            launch.terminate(procs)
            if self.tokenizer_manager is not None:
                self.tokenizer_manager.close()
        atexit.unregister(self.shutdown)

    def wait(self) -> int:
        """Block until one of this engine's processes exits; return its exit code. For a
        ``node_rank > 0`` engine, whose ranks end when rank 0 stops them."""
        if not self._procs:
            raise RuntimeError("the engine has been shut down")
        while True:
            for p in self._procs:
                if p.poll() is not None:
                    return p.returncode
            time.sleep(0.5)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def check_tensor_parallel(config: EngineConfig, model: ModelConfig) -> None:
    """ValueError unless ``model`` splits over ``config.tp_size`` ranks and the ranks of
    one node fit on its GPUs."""
    tp = config.tp_size
    sizes = [("num_attention_heads", model.num_heads), ("intermediate_size", model.intermediate_size)]
    # Mixture of experts: every expert's intermediate dimension is split too.
    sizes += [(k, model.hf[k]) for k in ("moe_intermediate_size", "shared_expert_intermediate_size")
              if model.hf.get(k)]
    for what, n in sizes:
        if n % tp:
            raise ValueError(f"tp_size={tp} does not divide the model's {what} ({n})")
    kv = model.num_kv_heads
    if kv % tp and tp % kv:
        raise ValueError(f"tp_size={tp} and the model's num_key_value_heads ({kv}) must divide one another "
                         "(kv heads are split, or replicated when tp_size > num_key_value_heads)")
    if config.device != "cpu":
        import torch

        from radixfleet.engine.executor.model_runner import resolve_device

        per_node = tp // config.nnodes
        if torch.cuda.is_available() and per_node > torch.cuda.device_count():
            raise ValueError(f"tp_size={tp} over nnodes={config.nnodes} needs {per_node} GPUs per node; "
                             f"{torch.cuda.device_count()} are visible")
        resolve_device(config.device)  # ValueError for cuda without a GPU


def _shape(outputs: list[dict], is_batch: bool) -> dict | list[dict]:
    return outputs if is_batch or len(outputs) != 1 else outputs[0]

