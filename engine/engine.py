"""``Engine``: SGLang's offline Python API over the three-process engine."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

from radixfleet.engine import ipc, launch
from radixfleet.engine.config import EngineConfig
from radixfleet.engine.io_struct import normalize_generate
from radixfleet.engine.model_prep import resolve_model_path
from radixfleet.engine.tokenizer_manager import TokenizerManager

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = float(os.environ.get("RADIXFLEET_START_TIMEOUT", "600"))


def _load_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


class Engine:
    """The inference engine. ``Engine(model_path=..., **engine_args)``; see ``EngineConfig``."""

    def __init__(self, **kwargs: Any):
        self.config = EngineConfig.from_kwargs(**kwargs)
        if self.config.tp_size > 1 or self.config.nnodes > 1:
            # The layers are TP-aware, but the per-rank scheduler processes and the NCCL
            # group are not built yet: refuse rather than silently run on one device.
            raise ValueError("tensor parallelism (tp_size > 1, nnodes > 1) is not supported yet")
        logging.getLogger("radixfleet").setLevel(self.config.log_level_int)
        self.model_path = resolve_model_path(self.config.model_path)
        if not os.path.isdir(self.model_path):
            raise ValueError(f"model_path {self.config.model_path!r} is not a folder (and not a known alias)")
        tokenizer_path = self.config.tokenizer_path or self.model_path
        self._procs: list = []
        names = ipc.new_ipc_names()
        tokenizer = None if self.config.skip_tokenizer_init else _load_tokenizer(
            tokenizer_path, self.config.trust_remote_code)
        self.tokenizer_manager = TokenizerManager(
            tokenizer, names, self.config.served_model_name or self.config.model_path)
        try:
            self._procs.append(launch.spawn("detokenizer", {
                "tokenizer_path": tokenizer_path, "trust_remote_code": self.config.trust_remote_code,
                "ipc_names": names, "skip_tokenizer_init": self.config.skip_tokenizer_init,
            }, self.config.log_level))
            self._procs.append(launch.spawn("scheduler", {
                "config": self.config, "model_path": self.model_path, "ipc_names": names,
            }, self.config.log_level))
            self.tokenizer_manager.wait_ready(self._procs, _START_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        self._finalizer = weakref.finalize(self, launch.terminate, list(self._procs))
        atexit.register(self.shutdown)

    # ---- generation ------------------------------------------------------------------------
    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool | list[bool] = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0, stream: bool = False,
                 rid: str | list[str] | None = None, return_hidden_states: bool = False,
                 return_text_in_logprobs: bool = False, custom_logit_processor: str | list | None = None,
                 **unsupported: Any) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (returns a dict) or a batch (returns a list of dicts).

        With ``stream=True`` returns an iterator of chunks whose ``text`` is the new text.
        """
        reqs, is_batch, tm = self._prepare(
            prompt, input_ids, sampling_params, stream, rid, return_logprob, logprob_start_len,
            top_logprobs_num, return_hidden_states, return_text_in_logprobs, custom_logit_processor,
            unsupported)
        if stream:
            return self._iter_stream(tm.stream_sync(reqs), is_batch)
        results = dict(tm.stream_sync(reqs))
        return _shape([results[i] for i in range(len(results))], is_batch)

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: dict | list[dict] | None = None,
                             input_ids: list[int] | list[list[int]] | None = None,
                             return_logprob: bool | list[bool] = False, logprob_start_len: int = -1,
                             top_logprobs_num: int = 0, stream: bool = False,
                             rid: str | list[str] | None = None, return_hidden_states: bool = False,
                             return_text_in_logprobs: bool = False,
                             custom_logit_processor: str | list | None = None,
                             **unsupported: Any) -> dict | list[dict] | AsyncIterator[dict]:
        """Awaitable ``generate``; with ``stream=True`` it returns an async iterator of chunks."""
        reqs, is_batch, tm = self._prepare(
            prompt, input_ids, sampling_params, stream, rid, return_logprob, logprob_start_len,
            top_logprobs_num, return_hidden_states, return_text_in_logprobs, custom_logit_processor,
            unsupported)
        if stream:
            return self._aiter_stream(tm.stream_async(reqs), is_batch)
        results = {i: out async for i, out in tm.stream_async(reqs)}
        return _shape([results[i] for i in range(len(results))], is_batch)

    def _prepare(self, prompt, input_ids, sampling_params, stream, rid, return_logprob,
                 logprob_start_len, top_logprobs_num, return_hidden_states, return_text_in_logprobs,
                 custom_logit_processor, unsupported: dict[str, Any]):
        """Validate one generate call (both flavours); return (requests, is_batch, manager)."""
        _refuse(unsupported)
        reqs, is_batch = normalize_generate(prompt, input_ids, sampling_params, stream, rid, return_logprob,
                                            logprob_start_len, top_logprobs_num, return_hidden_states,
                                            return_text_in_logprobs, custom_logit_processor)
        return reqs, is_batch, self._tm()

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
            return bool(self._tm().rpc_sync("flush_cache"))
        except RuntimeError:
            return False

    def get_server_info(self) -> dict:
        tm = self._tm()
        info = {f: getattr(self.config, f) for f in self.config.__dataclass_fields__}
        info.update(tm.server_info)
        info["model_path"] = self.model_path
        info["internal_states"] = [tm.rpc_sync("get_internal_state")]
        return info

    def abort_request(self, rid: str = "") -> None:
        self._tm().abort(rid)

    def _tm(self) -> TokenizerManager:
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
            launch.terminate(procs)
            self.tokenizer_manager.close()
        atexit.unregister(self.shutdown)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _shape(outputs: list[dict], is_batch: bool) -> dict | list[dict]:
    return outputs if is_batch or len(outputs) != 1 else outputs[0]


def _refuse(unsupported: dict[str, Any]) -> None:
    if unsupported:
        raise ValueError(f"unsupported generate argument(s): {', '.join(sorted(unsupported))}")


# Keep asyncio imported for type users of async_generate in notebooks.
_ = asyncio
