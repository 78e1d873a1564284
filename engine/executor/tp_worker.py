"""Tensor parallelism across scheduler processes: rank 0 leads, ranks > 0 follow.

Rank 0 runs the whole ``Scheduler`` (requests, radix cache, sampling, output). Each other rank
owns only a ``ModelRunner`` (its weight shards and a KV pool of the same number of slots) and
repeats every collective rank 0 makes, in the same order, from messages rank 0 broadcasts on
the CPU control group before each one:

- ``Forward``: the step's batch (token ids, slots, lengths) and, for an extend step, the
  req→token rows of each request's cached prefix. A decode step's prefix slots were all sent
  before: a table row only ever gains slots at ``kv_len`` (``KVManager.extend``) or is filled
  from the radix cache when a request is admitted, and an admitted request's first step is an
  extend. The follower writes the rows into its own table and runs the same forward.
  Everything in the message comes from rank 0's host copies (``ForwardBatch.from_host``),
  so sending it never waits for the device. Decode ids exist only on the device (sampled by
  the step before, possibly still running under the overlap schedule): rank 0 broadcasts
  them on the device group right after the message, queued behind that step.
- ``Logits``: rank 0 broadcasts the hidden states it wants logits for, and every rank runs
  the LM head on them (its vocab slice is all-gathered).
- ``Reload``: every rank loads its shards of a new weights folder (``update_weights_from_disk``).
- ``Stop``: the follower leaves its loop.

Followers never sample, so no random state or grammar needs to agree across ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from radixfleet.engine.executor.cpu_threads import core_guard
from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode
from radixfleet.engine.executor.model_runner import ModelRunner
from radixfleet.engine.layers import distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class Forward:
    mode: ForwardMode
    ids: torch.Tensor  # int64 cpu: [input ids (T)], rows (B), out slots (T), prefix slots
    seq_lens: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    send_prefix: bool  # extend steps carry each request's cached-prefix slots
    ids_on_device: bool  # the input ids follow as a device broadcast, not in ``ids``


@dataclass
class Logits:
    shape: tuple[int, int]


@dataclass
class Reload:
    path: str
    previous: str | None


@dataclass
class Stop:
    pass


class TPLeader:
    """Rank 0's view of the model: ``forward`` and ``compute_logits`` of a ``ModelRunner``,
    each announced to the followers first."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def forward(self, batch: ForwardBatch, sample_last_only: bool = True) -> torch.Tensor:
        assert batch.req_pool_indices_cpu is not None and batch.out_cache_loc_cpu is not None, \
            "tensor parallelism needs a batch built by ForwardBatch.from_host"
        send_prefix = batch.mode is ForwardMode.EXTEND
        ids_on_device = batch.input_ids_cpu is None
        parts = [] if ids_on_device else [batch.input_ids_cpu]
        parts += [batch.req_pool_indices_cpu, batch.out_cache_loc_cpu]
        if send_prefix:
            rows, host = batch.req_pool_indices_cpu.tolist(), self.runner.req_table.host
            parts += [host[r, :p] for r, p in zip(rows, batch.extend_prefix_lens_cpu, strict=True)]
        ids = torch.cat([p.to(torch.int64) for p in parts])
        dist.broadcast_control(Forward(batch.mode, ids, batch.seq_lens_cpu, batch.extend_prefix_lens_cpu,
                                       batch.extend_seq_lens_cpu, send_prefix, ids_on_device))
        if ids_on_device:
            dist.broadcast_tensor(batch.input_ids.contiguous())
        return self.runner.forward(batch, sample_last_only)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.contiguous()
        dist.broadcast_control(Logits(tuple(hidden.shape)))
        dist.broadcast_tensor(hidden)
        return self.runner.compute_logits(hidden)

    def update_weights(self, path: str, previous: str | None) -> tuple[bool, str]:
        dist.broadcast_control(Reload(path, previous))
        return self.runner.update_weights(path, previous)

    def stop(self) -> None:
        dist.broadcast_control(Stop())


def follow(runner: ModelRunner) -> None:
    """A follower rank's loop: mirror rank 0's forwards and LM-head calls until ``Stop``."""
    guard = core_guard(runner.device.type)
    while True:
        try:
            msg = dist.broadcast_control()
        except RuntimeError as e:  # gloo reports a closed connection: rank 0 is gone
            logger.error("tp rank %d: lost rank 0 (%s); exiting", dist.tp_rank(), str(e).splitlines()[0])
            raise SystemExit(1) from None
        if isinstance(msg, Forward):
            if guard is not None:
                guard.tick()
            runner.forward(_rebuild(runner, msg))
        elif isinstance(msg, Logits):
            hidden = torch.empty(msg.shape, dtype=runner.dtype, device=runner.device)
            runner.compute_logits(dist.broadcast_tensor(hidden))
        elif isinstance(msg, Reload):
            ok, message = runner.update_weights(msg.path, msg.previous)
            if not ok:
                logger.error("tp rank %d: %s", dist.tp_rank(), message)
        elif isinstance(msg, Stop):
            logger.info("tp rank %d: stop", dist.tp_rank())
            return
        else:
            raise AssertionError(f"unknown control message {type(msg).__name__}")


def _rebuild(runner: ModelRunner, msg: Forward) -> ForwardBatch:
    """The ForwardBatch rank 0 ran, on this rank's device; writes this rank's table rows."""
    table = runner.req_table
    n_tok, n_req = sum(msg.extend_lens), len(msg.seq_lens)
    host_ids = msg.ids
    at = 0 if msg.ids_on_device else n_tok
    input_ids = None if msg.ids_on_device else host_ids[:n_tok]
    rows = host_ids[at:at + n_req].tolist()
    out_loc = host_ids[at + n_req:at + n_req + n_tok]
    at += n_req + n_tok
    start = 0
    # Through the table's host copy: ``runner.forward`` flushes the writes in one copy.
    for row, prefix, ext in zip(rows, msg.prefix_lens, msg.extend_lens, strict=True):
        if msg.send_prefix and prefix:
            table.write(row, 0, host_ids[at:at + prefix])
            at += prefix
        table.write(row, prefix, out_loc[start:start + ext])
        start += ext
    batch = ForwardBatch.from_host(msg.mode, input_ids, rows, out_loc, table.table, msg.prefix_lens,
                                   msg.extend_lens)
    if msg.ids_on_device:
        batch.input_ids = dist.broadcast_tensor(torch.empty(n_tok, dtype=torch.int64, device=runner.device))
    return batch
