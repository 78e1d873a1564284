"""Gives requests KV slots and takes them back, through the radix cache.

The only place that moves slots between the allocator, the radix tree and requests:
- ``admit``: match the longest cached prefix, lock it, take a req_table row;
- ``extend``: allocate slots for the next ``n`` tokens (evicting unlocked tree leaves if short);
- ``release``: hand a request's computed tokens to the tree (or free them) and unlock.

Freed slots may be handed out again while a launched step still writes them (overlap
schedule): harmless, as every step runs on one device stream, so the new owner's writes
come after the old ones.
"""

from __future__ import annotations

import torch

from radixfleet.engine.managers.request import Req
from radixfleet.engine.memory.allocator import TokenSlotAllocator
from radixfleet.engine.memory.radix_cache import RadixCache
from radixfleet.engine.memory.req_table import ReqToTokenTable


class KVManager:
    def __init__(self, allocator: TokenSlotAllocator, table: ReqToTokenTable, cache: RadixCache):
        self.allocator = allocator
        self.table = table
        self.cache = cache
        self.page_size = allocator.page_size

    @property
    def free_tokens(self) -> int:
        """Slots that can be had now: free ones plus evictable cached ones."""
        return self.allocator.available + self.cache.evictable_size

    def decode_slots(self, reqs: list[Req]) -> int:
        """Slots a decode step of ``reqs`` takes: a new page for each whose last page is full."""
        return self.page_size * sum(r.kv_len % self.page_size == 0 for r in reqs)

    def match(self, req: Req):
        # Keep at least one token to compute, so the step yields logits for sampling. A
        # request on a LoRA adapter matches nothing: the tree holds the base model's KV.
        return self.cache.match_prefix([] if req.lora_id else req.fill_ids[: req.max_prefix_len])

    def admit(self, req: Req) -> bool:
        """Give ``req`` a table row and its cached prefix; False if no row is free."""
        row = self.table.alloc()
        if row is None:
            return False
        match = self.match(req)
        req.row, req.prefix_slots, req.last_node = row, match.indices, match.last_node
        req.kv_len = len(match.indices)
        self.cache.lock(match.last_node)
        if len(match.indices):
            self.table.write(row, 0, match.indices)
        return True

    def extend(self, req: Req, n: int) -> torch.Tensor | None:
        """Allocate and record slots for tokens [kv_len, kv_len + n); None if memory is short."""
        assert req.row is not None, "extend before admit"
        slots = self._alloc_for(req, n)
        if slots is None:
            return None
        self.table.write(req.row, req.kv_len, slots)
        return slots

    def _alloc_for(self, req: Req, n: int) -> torch.Tensor | None:
        head = torch.empty(0, dtype=torch.int64)
        used = req.kv_len % self.page_size
        if used:  # continue the request's partly filled last page
            last = self.table.slot(req.row, req.kv_len - 1)
            head = torch.arange(last + 1, last + 1 + min(self.page_size - used, n))
        rest = n - len(head)
        if rest == 0:
            return head
        if self.allocator.available < rest:
            self.cache.evict(rest - self.allocator.available)
        tail = self.allocator.alloc(rest)
        return None if tail is None else torch.cat([head, tail])

    def release(self, req: Req, keep_in_cache: bool = True) -> None:
        """Return the request's slots: computed tokens go to the radix tree for reuse."""
        if req.row is None:
            return
        slots = self.table.read(req.row, req.kv_len)
        own_from = len(req.prefix_slots)
        # Slots past fill_ids hold the KV of a pending token (a step still in flight when the
        # request finished): its id is unknown here, so the tree cannot key it; it is freed.
        known = min(req.kv_len, len(req.fill_ids))
        if keep_in_cache and not self.cache.disabled and not req.lora_id:
            cached = self.cache.insert(req.fill_ids[:known], slots[:known])
            aligned = known - known % self.page_size
            # Slots that duplicate what the tree already held, and the unaligned tail.
            self.allocator.free(slots[own_from:max(cached, own_from)])
            self.allocator.free(slots[aligned:])
        else:
            self.allocator.free(slots[own_from:])
        if req.last_node is not None:
            self.cache.unlock(req.last_node)
        self.table.free(req.row)
        req.row, req.last_node, req.kv_len = None, None, 0
        req.prefix_slots = torch.empty(0, dtype=torch.int64)
