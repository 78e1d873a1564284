"""Gives requests KV slots and takes them back, through the radix cache.

The only place that moves slots between the allocator, the radix tree and requests:
- ``admit``: match the longest cached prefix, lock it, take a req_table row;
- ``extend``: allocate slots for the next ``n`` tokens (evicting unlocked tree leaves if short);
- ``cache_computed``: after a prefill step (each chunk of a chunked one), hand the tokens it
  computed to the tree and hold them through it, so that requests admitted from the next
  step on reuse them while this one still runs;
- ``release``: hand a request's computed tokens to the tree (or free them) and unlock.

Freed slots may be handed out again while a launched step still writes them (overlap
schedule): harmless, as every step runs on one device stream, so the new owner's writes
come after the old ones. Likewise a slot that a launched step writes may be put in the tree
at once: whoever matches it computes in a later step.
"""

from __future__ import annotations

import torch

from radixfleet.engine.managers.request import Req
from radixfleet.engine.memory.allocator import TokenSlotAllocator
from radixfleet.engine.memory.radix_cache import RadixCache
from radixfleet.engine.memory.req_table import ReqToTokenTable


class KVManager:
    def __init__(self, allocator: TokenSlotAllocator, table: ReqToTokenTable, cache: RadixCache,
                 repoint_rows: bool = True):
        """``repoint_rows``: False with tensor parallelism, whose followers rewrite a row's
        prefix only at an extend step (``tp_worker``): a running request's row is then never
        pointed at other slots (see ``cache_computed``)."""
        self.allocator = allocator
        self.table = table
        self.cache = cache
        self.page_size = allocator.page_size
        self.repoint_rows = repoint_rows

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

    def cache_computed(self, reqs: list[Req]) -> None:
        """Insert each request's computed tokens (page-aligned) into the tree and lock them in
        place of its old prefix. Called after a prefill step's launch: every token below
        ``kv_len`` is a known id then (nothing is pending)."""
        if self.cache.disabled:
            return
        for req in reqs:
            if req.row is not None and not req.lora_id:
                self._cache(req, ending=False)

    def _cache(self, req: Req, ending: bool) -> None:
        """Where the tree already held some of the tokens (a request that computed them too
        inserted them first), the request's own copies are freed and, unless it is
        ``ending``, its row takes the tree's slots. Without ``repoint_rows`` a running
        request with such copies is left as it is until it ends."""
        own_from = len(req.prefix_slots)
        # Slots past fill_ids hold the KV of a pending token (a step still in flight when the
        # request finished): its id is unknown here, so the tree cannot key it.
        ids = req.fill_ids[:req.kv_len]
        ids = ids[:len(ids) - len(ids) % self.page_size]
        if len(ids) <= own_from:
            return
        if not (ending or self.repoint_rows) and len(self.cache.match_prefix(ids).indices) > own_from:
            return
        slots = self.table.read(req.row, len(ids))
        cached = self.cache.insert(ids, slots)
        match = self.cache.match_prefix(ids)
        assert len(match.indices) == len(ids), "the tree holds what was just inserted"
        if cached > own_from:
            self.allocator.free(slots[own_from:cached])
            if not ending:
                self.table.write(req.row, own_from, match.indices[own_from:cached])
        self.cache.lock(match.last_node)
        if req.last_node is not None:
            self.cache.unlock(req.last_node)
        req.prefix_slots, req.last_node = match.indices, match.last_node

    def release(self, req: Req, keep_in_cache: bool = True) -> None:
        """Return the request's slots: computed tokens go to the radix tree for reuse."""
        if req.row is None:
            return
        if keep_in_cache and not self.cache.disabled and not req.lora_id:
            self._cache(req, ending=True)
        # What the tree did not take: the unaligned tail, a pending token's slot, or all.
        self.allocator.free(self.table.read(req.row, req.kv_len)[len(req.prefix_slots):])
        if req.last_node is not None:
            self.cache.unlock(req.last_node)
        self.table.free(req.row)
        req.row, req.last_node, req.kv_len = None, None, 0
        req.prefix_slots = torch.empty(0, dtype=torch.int64)
