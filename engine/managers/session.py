"""Sessions (SGLang's ``open_session`` / ``close_session`` / ``session_params``): multi-turn
requests that continue from an earlier turn's tokens without resending them.

A session remembers, for each finished turn, its prompt tokens and its prompt + output
tokens. A request with ``session_params={"id": ..., "rid": ..., "offset": ...,
"replace": ..., "drop_previous_output": ...}`` becomes the tokens of the turn ``rid`` (the
session's latest turn when omitted; none for the first turn), cut at ``offset`` when given,
without that turn's output with ``drop_previous_output``, followed by the new input. The
radix cache already holds that context's KV, so only the new tokens are computed (while
memory pressure does not evict it). ``replace`` drops the other turns that continued from
the same turn. A session closes on ``close_session`` or after ``timeout`` idle seconds.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

_PARAM_KEYS = {"id", "rid", "offset", "replace", "drop_previous_output"}


@dataclass
class Turn:
    prompt: list[int]
    tokens: list[int]  # prompt + output
    parent: str | None


@dataclass
class Session:
    capacity_of_str_len: int
    timeout: float | None
    turns: dict[str, Turn] = field(default_factory=dict)
    last: str | None = None
    used: float = field(default_factory=time.monotonic)


class SessionStore:
    """Open sessions of one TokenizerManager; thread-safe (the receiver thread records turns)."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, capacity_of_str_len: int, session_id: str | None = None, streaming: bool = False,
             timeout: float | None = None) -> str:
        """``streaming`` is accepted for SGLang compatibility; every session appends alike."""
        if not isinstance(capacity_of_str_len, int) or capacity_of_str_len < 1:
            raise ValueError("capacity_of_str_len must be a positive integer")
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be positive seconds (or None: never)")
        session_id = session_id or uuid.uuid4().hex
        with self._lock:
            self._expire()
            if session_id in self._sessions:
                raise ValueError(f"session {session_id!r} is already open")
            self._sessions[session_id] = Session(capacity_of_str_len, timeout)
        return session_id

    def close(self, session_id: str) -> None:
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise ValueError(f"session {session_id!r} is not open")

    def context(self, params: Any, new_ids: list[int]) -> tuple[str, str | None, list[int]]:
        """(session id, parent turn, full prompt ids) for a request with ``session_params``."""
        if not isinstance(params, dict) or not isinstance(params.get("id"), str):
            raise ValueError('session_params must be a dict with the session "id"')
        unknown = sorted(set(params) - _PARAM_KEYS)
        if unknown:
            raise ValueError(f"unknown session_params key(s): {', '.join(unknown)}")
        with self._lock:
            self._expire()
            session = self._sessions.get(params["id"])
            if session is None:
                raise ValueError(f"session {params['id']!r} is not open")
            session.used = time.monotonic()
            parent = params.get("rid") or session.last
            if parent is None:
                return params["id"], None, list(new_ids)
            turn = session.turns.get(parent)
            if turn is None:
                raise ValueError(f"session {params['id']!r} has no finished request {parent!r}")
            base = turn.prompt if params.get("drop_previous_output") else turn.tokens
            offset = params.get("offset")
            if offset is not None and offset != -1:
                if not isinstance(offset, int) or not 0 <= offset <= len(base):
                    raise ValueError(f"session offset must be in [0, {len(base)}] or -1, got {offset!r}")
                base = base[:offset]
            if params.get("replace"):
                self._drop_children(session, parent)
            return params["id"], parent, base + list(new_ids)

    def record(self, session_id: str, rid: str, parent: str | None, prompt: list[int],
               output: list[int]) -> None:
        """A turn finished: later requests may continue from it."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.turns[rid] = Turn(prompt, prompt + output, parent)
                session.last = rid

    def _drop_children(self, session: Session, parent: str) -> None:
        doomed = [rid for rid, t in session.turns.items() if t.parent == parent]
        while doomed:
            rid = doomed.pop()
            session.turns.pop(rid, None)
            doomed += [r for r, t in session.turns.items() if t.parent == rid]
        if session.last is not None and session.last not in session.turns:
            session.last = parent

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._sessions.items() if v.timeout and now - v.used > v.timeout]:
            del self._sessions[sid]
