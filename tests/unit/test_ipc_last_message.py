"""Regression: a child's "ready" report was lost when its socket closed right after sending.

PUSH sockets here have LINGER 0; ``launch._start`` sent "ready" and then dropped the socket,
so a report still queued (the engine's PULL side not yet connected, or a loaded machine)
was discarded and the engine waited out its 600 s start-up timeout (seen in CI as a hung
``Engine(...)`` in tests/integration/test_decoder_embeddings.py)."""

from __future__ import annotations

import zmq

from radixfleet.engine.managers import ipc


def test_last_message_is_delivered_after_its_socket_closes(tmp_path):
    ctx = zmq.Context()
    addr = f"ipc://{tmp_path}/ready"
    try:
        push = ipc.connect_push(ctx, addr)  # nobody listens yet: the message stays queued
        ipc.send_last(push, {"ready": "scheduler", "info": {"max_total_tokens": 7}})
        assert push.closed
        pull = ipc.bind_pull(ctx, addr)
        assert pull.poll(5000), "the report sent before close never arrived"
        assert ipc.recv(pull) == {"ready": "scheduler", "info": {"max_total_tokens": 7}}
        pull.close(linger=0)
    finally:
        ctx.term()


def test_plain_close_after_send_drops_the_message(tmp_path):
    """What the bug was: the same sequence with the socket's LINGER 0 loses the message."""
    ctx = zmq.Context()
    addr = f"ipc://{tmp_path}/ready"
    try:
        push = ipc.connect_push(ctx, addr)
        ipc.send(push, {"ready": "scheduler"})
        push.close()
        pull = ipc.bind_pull(ctx, addr)
        assert not pull.poll(500)
        pull.close(linger=0)
    finally:
        ctx.term()
