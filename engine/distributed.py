"""Tensor-parallel state: this process's rank and group, and the collectives layers use.

With ``tp_size == 1`` (the default) every collective is a no-op and torch.distributed is
never initialised.
"""

from __future__ import annotations

import torch

_TP_RANK = 0
_TP_SIZE = 1


def init_tensor_parallel(tp_rank: int, tp_size: int, init_method: str | None, backend: str,
                         world_rank: int | None = None) -> None:
    global _TP_RANK, _TP_SIZE
    _TP_RANK, _TP_SIZE = tp_rank, tp_size
    if tp_size > 1:
        import torch.distributed as dist

        dist.init_process_group(backend=backend, init_method=init_method,
                                world_size=tp_size, rank=tp_rank if world_rank is None else world_rank)


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
