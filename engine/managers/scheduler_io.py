"""How a scheduler talks to the rest of the engine, injected so that it can be built and
driven without processes.

``ZmqSchedulerIO`` is the engine's: a PULL socket for requests and control calls from the
TokenizerManager, PUSH sockets to the Detokenizer (token outputs) and back to the
TokenizerManager (control replies, refused requests). ``QueueSchedulerIO`` keeps the same
three channels in memory (a scheduler inside one process, and the scheduler's unit tests).
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import zmq

from radixfleet.engine.managers import ipc
from radixfleet.engine.managers.io_struct import ControlReq

logger = logging.getLogger(__name__)


class SchedulerIO(Protocol):
    def recv(self, timeout_ms: int) -> Any | None:
        """The next incoming message, waiting up to ``timeout_ms``; None if none came."""

    def to_detokenizer(self, msg: Any) -> None:
        """Token outputs (``BatchTokenOut``); the embedding scheduler sends none."""

    def to_tokenizer(self, msg: Any) -> None:
        """Control replies, refused requests and embedding outputs."""


def dispatch(handlers: Mapping[type, Callable[[Any], None]], msg: Any, io: SchedulerIO) -> None:
    """Run the handler of ``msg``'s type. A control call without one is answered with an
    error (its caller would otherwise wait out its timeout); other messages are logged."""
    handler = handlers.get(type(msg))
    if handler is not None:
        handler(msg)
    elif isinstance(msg, ControlReq):
        io.to_tokenizer(msg.reply(error=f"unknown method {msg.call_name!r}"))
    else:
        logger.error("the scheduler got an unknown message %r", type(msg).__name__)


class ZmqSchedulerIO:
    def __init__(self, ipc_names: dict[str, str], detokenizer: bool = True):
        ctx = zmq.Context()
        self._recv = ipc.bind_pull(ctx, ipc_names["scheduler"])
        self._detok = ipc.connect_push(ctx, ipc_names["detokenizer"]) if detokenizer else None
        self._reply = ipc.connect_push(ctx, ipc_names["tokenizer"])

    def recv(self, timeout_ms: int) -> Any | None:
        return ipc.recv(self._recv) if self._recv.poll(timeout_ms) else None

    def to_detokenizer(self, msg: Any) -> None:
        assert self._detok is not None, "this scheduler has no detokenizer"
        ipc.send(self._detok, msg)

    def to_tokenizer(self, msg: Any) -> None:
        ipc.send(self._reply, msg)


class QueueSchedulerIO:
    """In-memory channels: put requests in ``inbox``; read ``outputs`` and ``replies``."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.outputs: list[Any] = []
        self.replies: list[Any] = []

    def recv(self, timeout_ms: int) -> Any | None:
        try:
            return self.inbox.get(timeout=timeout_ms / 1000) if timeout_ms else self.inbox.get_nowait()
        except queue.Empty:
            return None

    def to_detokenizer(self, msg: Any) -> None:
        self.outputs.append(msg)

    def to_tokenizer(self, msg: Any) -> None:
        self.replies.append(msg)
