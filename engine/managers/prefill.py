"""Which waiting requests join the next prefill batch, and how many of their tokens.

Accounting (checked once per candidate, in ``PrefillAdder.add``):
- tokens: a batch computes at most ``chunk_budget`` new tokens; a request longer than what
  is left is split (chunked prefill) and finishes its prefill in later steps;
- KV: admitting needs its new tokens plus a reserve for the decode tokens it and the
  running requests will still produce (``remaining × new_token_ratio``), all within the
  slots that are free or evictable now.

In-batch prefix sharing: a waiting request whose prompt shares at least ``IN_BATCH_SHARE_MIN``
tokens beyond its cached prefix with what a request admitted to this batch computes waits
for the next step, where the radix cache holds them (``KVManager.cache_computed``), instead
of computing them a second time. It waits at most once, and only behind a request in the
batch, so a deferral never leaves a batch empty.
"""

from __future__ import annotations

from collections.abc import Callable

from radixfleet.engine.managers.kv_manager import KVManager
from radixfleet.engine.managers.request import Req

# Past this queue length lpm falls back to fcfs: matching every waiting request costs more
# than the reuse it finds.
_LPM_MAX_QUEUE = 128
# Reserve at most this many future decode tokens per request.
_RESERVE_CLIP = 4096
# Defer a request that shares at least this many uncached tokens with one in the batch
# (SGLang's in-batch prefix threshold): fewer cost less to compute twice than a step's wait.
IN_BATCH_SHARE_MIN = 32


def _order_fcfs(waiting: list[Req], kv: KVManager) -> list[Req]:
    return sorted(waiting, key=lambda r: r.arrival_time)


def _order_lpm(waiting: list[Req], kv: KVManager) -> list[Req]:
    if len(waiting) > _LPM_MAX_QUEUE:
        return _order_fcfs(waiting, kv)
    prefix_len = {id(r): len(kv.match(r).indices) for r in waiting}
    return sorted(waiting, key=lambda r: (-prefix_len[id(r)], r.arrival_time))


SCHEDULE_POLICIES: dict[str, Callable[[list[Req], KVManager], list[Req]]] = {
    "fcfs": _order_fcfs,
    "lpm": _order_lpm,
}


def decode_reserve(req: Req, ratio: float) -> int:
    return int(min(req.remaining_new_tokens, _RESERVE_CLIP) * ratio)


class PrefillAdder:
    def __init__(self, kv: KVManager, running: list[Req], chunk_budget: int, max_running: int,
                 new_token_ratio: float):
        self.kv = kv
        self.chunk_budget = chunk_budget
        self.slots_left = max_running - len(running)
        self.ratio = new_token_ratio
        self.kv_budget = kv.free_tokens - sum(decode_reserve(r, new_token_ratio) for r in running)
        self.nothing_running = not running
        self.batch: list[Req] = []
        # Each batch member's prompt and how many of its tokens (whole pages) it will have
        # computed after this step, for in-batch sharing (a reference, not a copy).
        self._computed: list[tuple[list[int], int]] = []

    def add(self, req: Req, continuing: bool = False) -> bool:
        """Try to put ``req`` in the batch; False means stop adding (budget exhausted).

        ``continuing``: the request part-way through a chunked prefill. It is not in
        ``running`` yet, but it holds a running slot and will decode: it takes its slot and
        its decode reserve here, even when no token budget is left for it this step, so
        the requests admitted after it never outnumber ``max_running``."""
        if continuing:
            self.slots_left -= 1
            self.kv_budget -= decode_reserve(req, self.ratio)
        if self.chunk_budget <= 0 or (not continuing and self.slots_left <= 0):
            return False
        if not continuing:
            prefix = len(self.kv.match(req).indices)
            if not req.deferred and self._shares_with_batch(req, prefix):
                req.deferred = True  # admitted next step, with the prefix cached
                return True
            need = len(req.fill_ids) - prefix
            must_fit = need + decode_reserve(req, self.ratio)
            alone = self.nothing_running and not self.batch
            # Alone in the engine, a request may start as long as its prompt fits:
            # retraction and re-admission handle the rest.
            if must_fit > self.kv_budget and not (alone and need <= self.kv_budget):
                return False
            if not self.kv.admit(req):
                return False
            self.slots_left -= 1
        todo = len(req.fill_ids) - req.kv_len
        n = min(todo, self.chunk_budget)
        if self.kv.extend(req, n) is None:
            if not continuing:
                self.kv.release(req)
                self.slots_left += 1
            return False
        if req.cached_tokens < 0:
            req.cached_tokens = req.kv_len
        req.extend_len = n
        self.chunk_budget -= n
        self.kv_budget -= n if continuing else n + decode_reserve(req, self.ratio)
        self.batch.append(req)
        if not req.lora_id and not self.kv.cache.disabled:
            end = req.kv_len + n
            self._computed.append((req.fill_ids, end - end % self.kv.page_size))
        return n == todo

    def _shares_with_batch(self, req: Req, prefix: int) -> bool:
        """Whether ``req``'s reusable prompt shares ``IN_BATCH_SHARE_MIN`` tokens past its
        cached ``prefix`` (pages included) with what a batch member computes this step."""
        if req.lora_id or self.kv.cache.disabled or not self._computed:
            return False
        page = self.kv.page_size
        end = -(-(prefix + IN_BATCH_SHARE_MIN) // page) * page
        if end > req.max_prefix_len:
            return False
        ids = req.fill_ids
        # The part past the cached prefix first: it tells most pairs apart in a few tokens.
        return any(computed >= end and other[prefix:end] == ids[prefix:end] and other[:prefix] == ids[:prefix]
                   for other, computed in self._computed)
