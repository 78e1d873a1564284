"""Structured outputs with xgrammar: compile off the critical path, mask logits per step.

- ``GrammarBackend``: one xgrammar compiler for the tokenizer; compilation runs on a
  worker thread, and its result (or its error) is cached by the grammar's key, so the
  same schema is compiled once however many requests use it.
- ``GrammarQueue``: requests whose grammar is still compiling wait here, not in the
  scheduler's queue; each loop the scheduler takes the ready ones (or fails the bad ones).
- ``GrammarMasker``: per step, one bitmask for the batch, filled by xgrammar's batched
  matcher and applied to the logits in place before sampling.
"""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from radixfleet import env_vars
from radixfleet.engine.sampling.params import SamplingParams

logger = logging.getLogger(__name__)

GRAMMAR_KINDS = ("json_schema", "regex", "ebnf")
# Compile time grows about cubically with a JSON schema's nesting (200 levels: 0.7 s on one
# core) and linearly with its width (1,000 properties with patterns: 17 s): deeper schemas
# are refused, and a request whose grammar is not compiled in time fails alone.
# (The timeout is RADIXFLEET_GRAMMAR_COMPILE_TIMEOUT.)
MAX_JSON_SCHEMA_DEPTH = 64
_XGR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def grammar_key(params: SamplingParams) -> tuple[str, str] | None:
    for kind in GRAMMAR_KINDS:
        value = getattr(params, kind)
        if value is not None:
            return kind, value
    return None


def _json_depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [v for x in level if isinstance(x, (dict, list))
                 for v in (x.values() if isinstance(x, dict) else x)]
    return depth - 1


def check_json_schema_depth(schema: str) -> None:
    """ValueError for a schema nested deeper than ``MAX_JSON_SCHEMA_DEPTH`` (or not JSON)."""
    try:
        depth = _json_depth(json.loads(schema))
    except (ValueError, RecursionError):
        raise ValueError("invalid json_schema: not a JSON document (or nested too deeply to read)") from None
    if depth > MAX_JSON_SCHEMA_DEPTH:
        raise ValueError(f"json_schema nests {depth} levels deep; at most {MAX_JSON_SCHEMA_DEPTH} are "
                         "compiled (compile time grows steeply with depth)")


def _clean_error(exc: BaseException) -> str:
    return _XGR_LOCATION.sub("", str(exc).strip()).strip()


class GrammarBackend:
    """Compiles grammars for one tokenizer; ``compile`` returns a cached Future."""

    def __init__(self, tokenizer_loader, vocab_size: int, threads: int = 1):
        self._tokenizer_loader = tokenizer_loader  # called on the worker thread, once
        self.vocab_size = vocab_size
        self._compiler = None
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="grammar-compile")
        self._cache: dict[tuple[str, str], Future] = {}

    def _get_compiler(self):
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer_loader(), vocab_size=self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def _compile(self, key: tuple[str, str]):
        kind, value = key
        if kind == "json_schema":
            check_json_schema_depth(value)
        compiler = self._get_compiler()
        try:
            if kind == "json_schema":
                # Compact JSON (no free whitespace): small models otherwise drift into
                # endless indentation inside an object.
                return compiler.compile_json_schema(value, any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(value)
            return compiler.compile_grammar(value)
        except RuntimeError as e:
            raise ValueError(f"invalid {kind}: {_clean_error(e)}") from None

    def compile(self, key: tuple[str, str]) -> Future:
        fut = self._cache.get(key)
        if fut is None:
            fut = self._cache[key] = self._pool.submit(self._compile, key)
        return fut

    def abandon(self, key: tuple[str, str]) -> None:
        """Give up on a compilation that took too long: forget it, and let the grammars queued
        behind it compile on a fresh worker (the old one finishes alone; its result is dropped)."""
        fut = self._cache.pop(key, None)
        if fut is not None and not fut.cancel():
            stuck, self._pool = self._pool, ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
            stuck.shutdown(wait=False, cancel_futures=True)
            queued = [k for k, f in self._cache.items() if f.cancelled()]
            for k in queued:
                del self._cache[k]
                self.compile(k)


class GrammarQueue:
    """Requests waiting for their grammar; ``take_ready`` moves them on."""

    def __init__(self, backend_factory):
        self._backend_factory = backend_factory
        self._backend: GrammarBackend | None = None
        self.pending: list[tuple[Any, Future]] = []
        self._waiting_since: dict[int, tuple[tuple[str, str], float]] = {}  # id(req) → (key, time added)

    def add(self, req, key: tuple[str, str]) -> None:
        if self._backend is None:
            self._backend = self._backend_factory()
        self.pending.append((req, self._backend.compile(key)))
        self._waiting_since[id(req)] = (key, time.monotonic())

    def take_ready(self) -> tuple[list, list[tuple[Any, str]]]:
        """(requests now ready with ``req.grammar`` set, [(request, error message)])."""
        import xgrammar as xgr

        ready, failed, still = [], [], []
        now, timeout = time.monotonic(), env_vars.GRAMMAR_COMPILE_TIMEOUT.get()
        for req, fut in self.pending:
            key, since = self._waiting_since[id(req)]
            if fut.cancelled():  # queued behind an abandoned compilation: queued again
                fut = self._backend.compile(key)
            if not fut.done() and now - since > timeout:
                self._backend.abandon(key)
                failed.append((req, f"the request's {key[0]} did not compile within {timeout:g} s"))
                continue
            if not fut.done():
                still.append((req, fut))
                continue
            exc = fut.exception()
            if exc is not None:
                msg = str(exc) if isinstance(exc, ValueError) else f"grammar compilation failed: {exc}"
                failed.append((req, msg))
                continue
            req.grammar = xgr.GrammarMatcher(fut.result())
            ready.append(req)
        self.pending = still
        for req in ready + [r for r, _ in failed]:
            self._waiting_since.pop(id(req), None)
        return ready, failed

    def remove(self, rid: str) -> list:
        """Drop the pending requests with this id ("" drops all); return them."""
        gone = [r for r, _ in self.pending if not rid or r.rid == rid]
        self.pending = [(r, f) for r, f in self.pending if r not in gone]
        for req in gone:
            self._waiting_since.pop(id(req), None)
        return gone


class GrammarMasker:
    """Fills one token bitmask for the constrained rows of a batch and applies it."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._bitmask: torch.Tensor | None = None  # [B, ceil(V / 32)] int32, CPU
        self._batch_matcher = None

    def apply(self, logits: torch.Tensor, reqs: list) -> None:
        """Mask ``logits`` [B, V] in place where ``reqs[i].grammar`` is set."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if not rows:
            return
        import xgrammar as xgr  # only once a constrained request exists (not needed otherwise)

        b = logits.shape[0]
        if self._bitmask is None or self._bitmask.shape[0] < b:
            self._bitmask = xgr.allocate_token_bitmask(max(b, 16), self.vocab_size)
            self._batch_matcher = xgr.BatchGrammarMatcher(max_threads=1)
        bitmask = self._bitmask[:b]
        self._batch_matcher.batch_fill_next_token_bitmask([reqs[i].grammar for i in rows], bitmask, rows)
        mask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=logits.shape[-1], indices=rows)

    @staticmethod
    def accept(req, token: int) -> None:
        """Advance the request's grammar; finish it when the grammar is complete."""
        matcher = req.grammar
        if not matcher.accept_token(token):
            # Only reachable if something sampled outside the mask.
            req.finish("abort", message=f"token {token} violates the request's grammar")
            return
        if matcher.is_terminated() and req.finished_reason is None:
            req.finish("stop", token)
