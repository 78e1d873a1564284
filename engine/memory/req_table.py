"""Request → token table: row r lists the KV slots of request r's tokens, in order."""

from __future__ import annotations

import torch


class ReqToTokenTable:
    def __init__(self, max_requests: int, max_context_len: int, device: torch.device | str):
        # [max_requests, max_context_len] int32, on the model's device (kernels read it).
        self.table = torch.zeros((max_requests, max_context_len), dtype=torch.int32, device=device)
        self.max_context_len = max_context_len
        self._free_rows = list(range(max_requests - 1, -1, -1))

    @property
    def available(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        self.table[row, start:start + len(slots)] = slots.to(self.table.device, torch.int32)

    def read(self, row: int, end: int) -> torch.Tensor:
        return self.table[row, :end].to("cpu", torch.int64)
