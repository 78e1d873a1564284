"""Tensor-parallel state: this process's rank and group, and the collectives layers use.

With ``tp_size == 1`` (the default) every collective is a no-op and torch.distributed is
never initialised. With ``tp_size > 1`` the default group (NCCL on CUDA, gloo on CPU) spans
every rank of the replica, and a second, gloo-only *control* group carries the scheduler's
per-step messages from rank 0 to the followers on the CPU.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch

_TP_RANK = 0
_TP_SIZE = 1
_CONTROL = None  # gloo process group for rank 0 → follower messages
# Followers wait in a control broadcast while the engine is idle: that wait must not time out.
_CONTROL_TIMEOUT = timedelta(days=365)


def init_tensor_parallel(tp_rank: int, tp_size: int, init_method: str | None, backend: str) -> None:
    """Join the replica's process group as ``tp_rank`` (a global rank across nodes)."""
    global _TP_RANK, _TP_SIZE, _CONTROL
    _TP_RANK, _TP_SIZE = tp_rank, tp_size
    if tp_size > 1:
        import torch.distributed as dist

        dist.init_process_group(backend=backend, init_method=init_method, world_size=tp_size, rank=tp_rank,
                                timeout=_CONTROL_TIMEOUT if backend == "gloo" else None)
        _CONTROL = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo",
                                                                              timeout=_CONTROL_TIMEOUT)


def tp_rank() -> int:
    return _TP_RANK


def tp_size() -> int:
    return _TP_SIZE


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP_SIZE == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _TP_SIZE == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` any rank holds (so every rank sizes its KV pool alike)."""
    if _TP_SIZE == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_CONTROL)
    return int(t.item())


def broadcast_control(obj: Any = None) -> Any:
    """Rank 0 sends ``obj`` to every rank; every rank returns it (over the CPU control group)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_CONTROL)
    return box[0]


def broadcast_tensor(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``x`` into ``x`` on every rank (over the default group, on ``x``'s device)."""
    import torch.distributed as dist

    dist.broadcast(x, src=0)
    return x

