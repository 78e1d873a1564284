"""radixfleet.engine: an inference engine with SGLang's ``Engine`` API.

Public API: ``Engine`` (``engine.py``) and its configuration ``EngineConfig``
(``config.py``: the fields are the ``Engine(**kwargs)`` and the ``radixfleet serve`` flags).

Where each concept lives, in the direction imports go (entry points → managers → executor
→ memory / attention / layers / models / sampling; ``tests/unit/test_import_graph.py``
fails on any cycle):

- ``server/``: the HTTP server. ``http_server.py`` assembles the app (auth and body-size
  guard, native routes); ``openai_serving.py``, ``embedding_serving.py`` and
  ``admin_serving.py`` add the OpenAI, embedding and control routes; ``common.py`` holds
  what they share (errors, server state, JSON bodies, streaming); ``openai_protocol.py``,
  ``chat_template.py`` and ``tool_parser.py`` the OpenAI request shapes; ``metrics.py``
  the Prometheus metrics; ``serve.py`` the ``radixfleet serve`` command.
- ``managers/``: the processes and what flows between them. ``tokenizer_manager.py`` (in
  the caller's process) → ``scheduler.py`` (continuous batching; ``prefill.py`` admission,
  ``kv_manager.py`` slots and radix cache, ``stop.py``, ``request.py``'s ``Req``;
  ``scheduler_io.py`` its injected message channels) → ``detokenizer.py``;
  ``embedding_scheduler.py`` for embedding models; ``io_struct.py`` the messages,
  ``ipc.py`` the sockets, ``launch.py`` the child processes; ``session.py``,
  ``scoring.py`` and ``request_validation.py``.
- ``executor/``: running a chosen batch on the device. ``model_runner.py`` (weights, KV
  pool, attention backend), ``forward_batch.py`` (the tensors of one step),
  ``step_executor.py``, ``cuda_graph.py``, ``tp_worker.py`` (tensor parallelism),
  ``weight_update.py``, ``lora.py``.
- ``memory/``: ``allocator.py`` (token slots), ``req_table.py`` (request → token slots),
  ``radix_cache.py`` (prefix cache), ``kv_pool.py`` (the K/V buffers), ``transfer.py``.
- ``attention/``: the backend interface (``base.py``) and its ``torch_native``, ``triton``
  and ``flashinfer`` implementations, picked through ``registry.py``.
- ``layers/``: TP-aware linear, embedding, norm, rotary, activation and fused layers;
  ``distributed.py`` the tensor-parallel group.
- ``models/``: the architectures (``llama.py``, ``bert.py``) and their ``registry.py``;
  ``model_config.py`` reads HF configs, ``model_prep.py`` resolves model paths and aliases,
  ``configs/`` ships full-size configs for random-weight benchmarks.
- ``sampling/``: sampling parameters, penalties, the sampler, logprobs, grammar masks
  (``grammar.py``, xgrammar) and custom logit processors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixfleet.engine.config import EngineConfig
    from radixfleet.engine.engine import Engine

__all__ = ["Engine", "EngineConfig"]


def __getattr__(name: str):
    # Lazy, so that ``radixfleet.engine.<submodule>`` imports never pull in the Engine (and torch).
    if name == "Engine":
        from radixfleet.engine.engine import Engine

        return Engine
    if name == "EngineConfig":
        from radixfleet.engine.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
