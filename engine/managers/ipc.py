"""The sockets between the engine's processes: pyzmq PUSH/PULL pairs over ``ipc://``
paths, carrying pickled messages (the dataclasses of ``io_struct.py``)."""

from __future__ import annotations

import os
import pickle
import tempfile
import uuid
from typing import Any

import zmq


def new_ipc_names() -> dict[str, str]:
    base = os.path.join(tempfile.gettempdir(), f"radixfleet-{uuid.uuid4().hex[:12]}")
    return {name: f"ipc://{base}-{name}" for name in ("scheduler", "detokenizer", "tokenizer")}


def bind_pull(ctx: zmq.Context, addr: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.bind(addr)
    return sock


def connect_push(ctx: zmq.Context, addr: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    return sock


def send(sock: zmq.Socket, obj: Any) -> None:
    sock.send(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


# How long closing a socket after its last message waits for that message to leave.
LAST_MESSAGE_LINGER_MS = 10_000


def send_last(sock: zmq.Socket, obj: Any) -> None:
    """Send ``obj`` and close ``sock`` once it has left (or after LAST_MESSAGE_LINGER_MS).
    PUSH sockets here have LINGER 0, so closing (or dropping) one right after a send
    discarded a message still queued: a loaded machine lost a child's "ready" report and the
    engine waited out its start-up timeout."""
    send(sock, obj)
    sock.close(linger=LAST_MESSAGE_LINGER_MS)


def recv(sock: zmq.Socket, flags: int = 0) -> Any:
    return pickle.loads(sock.recv(flags))
