"""Request → token table: row r lists the KV slots of request r's tokens, in order.

Two copies: ``host`` (CPU, what the scheduler reads and writes) and ``table`` (on the model's
device, what the attention kernels read). Writes land in ``host`` at once and are queued;
``flush`` (called before every forward) applies the queued ones to ``table`` in one batched
copy, so a decode step of B requests costs one host→device transfer instead of B, and
reading a row never waits for the device.
"""

from __future__ import annotations

import torch

from radixfleet.engine.memory.transfer import to_device


class ReqToTokenTable:
    def __init__(self, max_requests: int, max_context_len: int, device: torch.device | str):
        # [max_requests, max_context_len] int32.
        self.table = torch.zeros((max_requests, max_context_len), dtype=torch.int32, device=device)
        self.host = torch.zeros((max_requests, max_context_len), dtype=torch.int32)
        self.max_context_len = max_context_len
        self._free_rows = list(range(max_requests - 1, -1, -1))
        self._pending_rows: list[int] = []
        self._pending_cols: list[int] = []

    @property
    def available(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        n = len(slots)
        self.host[row, start:start + n] = slots.to("cpu", torch.int32)
        self._pending_rows += [row] * n
        self._pending_cols += range(start, start + n)

    def flush(self) -> None:
        """Copy every write since the last flush to the device table."""
        if not self._pending_rows:
            return
        index = torch.tensor([self._pending_rows, self._pending_cols], dtype=torch.int64)
        # Values come from ``host`` (a position written twice gets its final value).
        packed = torch.cat([index, self.host[index[0], index[1]].to(torch.int64)[None]])
        # Queued behind a step still running (overlap schedule) instead of waiting for it.
        packed = to_device(packed, torch.int64, self.table.device)
        self.table[packed[0], packed[1]] = packed[2].to(torch.int32)
        self._pending_rows, self._pending_cols = [], []

    def read(self, row: int, end: int) -> torch.Tensor:
        return self.host[row, :end].to(torch.int64)

    def slot(self, row: int, pos: int) -> int:
        return int(self.host[row, pos])
