"""Token-slot KV allocator: hands out KV-cache slot indices, a page at a time.

Slot 0 is never handed out (it is the padding slot writes of padded batch rows go to).
With ``page_size > 1`` slots come in aligned pages of ``page_size`` consecutive slots;
``alloc`` returns whole pages and the caller uses as many slots as it needs.
"""

from __future__ import annotations

import torch


class TokenSlotAllocator:
    def __init__(self, num_slots: int, page_size: int = 1):
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        if num_slots < 2 * page_size:
            raise ValueError(f"the KV pool needs at least {2 * page_size} slots, got {num_slots}")
        self.page_size = page_size
        self.num_pages = num_slots // page_size
        self.size = (self.num_pages - 1) * page_size  # usable slots (page 0 is reserved)
        self.clear()

    def clear(self) -> None:
        # Free pages, as page numbers; popped from the end.
        self._free_pages = list(range(self.num_pages - 1, 0, -1))

    @property
    def available(self) -> int:
        return len(self._free_pages) * self.page_size

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        """Slots for ``num_tokens`` tokens (rounded up to whole pages), or None if short."""
        pages = -(-num_tokens // self.page_size)
        if pages > len(self._free_pages):
            return None
        # Reversed: a fresh pool hands out ascending runs (forward reads of a request's KV
        # stream better than backward ones: ~1.7x for the CPU decode kernel).
        taken = self._free_pages[len(self._free_pages) - pages:][::-1]
        del self._free_pages[len(self._free_pages) - pages:]
        if self.page_size == 1:
            return torch.tensor(taken, dtype=torch.int64)
        base = torch.tensor(taken, dtype=torch.int64)[:, None] * self.page_size
        return (base + torch.arange(self.page_size)).flatten()[:num_tokens]

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        if self.page_size == 1:
            self._free_pages.extend(slots.tolist())
        else:
            self._free_pages.extend(torch.unique(slots // self.page_size).tolist())
