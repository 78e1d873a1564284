"""What each worker's radix cache really holds, rebuilt from its KV events.

One ``WorkerBlocks`` per publishing worker: the set of its resident block hashes
(``radixfleet/kv_events.py``), the requests it has received and not yet prefilled with
their blocks (``queued``: what it is about to hold), the engine identity and ``seq`` they
are current to, and a sync state:

- ``syncing``: waiting for a snapshot; messages that arrive meanwhile are buffered, and
  those after the snapshot's ``seq`` are replayed onto it;
- ``live``: every message since the snapshot applied in ``seq`` order.

Besides, ``routed``: requests another router replica has just sent the worker (``peers.py``),
by the hash of their last block, until the worker's own ``queued`` event for the same prompt
arrives or a few seconds pass. They count like queued requests; they live outside the
engine's state, so a snapshot keeps them.

A message from another engine identity (the engine restarted), a ``seq`` that skips one (a
lost message; heartbeats repeat the last ``seq``, so a lost last message shows within a
second), or a snapshot older than the buffered messages all send the worker back to
``syncing``; the caller (``kv_subscriber.py``) then fetches a snapshot. A worker is
``in_sync`` while live and heard from within ``stale_after`` seconds; only then does the
precise policy trust its blocks (``policies/precise.py``).

Event-loop thread only: no locks.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from radixfleet import kv_events
from radixfleet.kv_events import EventBatch, Snapshot

_MAX_BUFFERED = 10_000  # messages kept while syncing; past it the oldest go (a resync follows)


@dataclass
class WorkerBlocks:
    url: str
    state: str = "syncing"  # or "live"
    engine: str = ""
    seq: int = 0
    block_size: int = kv_events.DEFAULT_BLOCK_SIZE
    seed: int = kv_events.SEED
    blocks: set[int] = field(default_factory=set)
    queued: dict[str, list[int]] = field(default_factory=dict)  # rid -> its prompt's blocks
    queued_blocks: Counter = field(default_factory=Counter)  # block -> queued requests with it
    # last block -> (blocks, deadline, announced at, announcing replica)
    routed: dict[int, tuple[list[int], float, float, str]] = field(default_factory=dict)
    last_message: float = 0.0  # monotonic time of the last message (or snapshot)
    buffered: list[EventBatch] = field(default_factory=list)
    resyncs: int = 0

    def apply(self, batch: EventBatch) -> None:
        for ev in batch.events:
            kind = ev["type"]
            if kind == "stored":
                self.blocks.update(ev["hashes"])
            elif kind == "removed":
                self.blocks.difference_update(ev["hashes"])
            elif kind == "cleared":
                self.blocks.clear()
            elif kind == "queued":
                self.settle([ev["rid"]])
                self.queued[ev["rid"]] = ev["hashes"]
                self.queued_blocks.update(ev["hashes"])
                if ev["hashes"]:  # the engine has it now: a peer's announcement of it is done
                    self.unroute(ev["hashes"][-1])
            elif kind == "settled":
                self.settle(ev["rids"])
        self.seq = batch.seq

    def settle(self, rids: Sequence[str]) -> None:
        for rid in rids:
            self.settle_blocks(self.queued.pop(rid, ()))

    def route(self, hashes: list[int], deadline: float, ts: float = 0.0, router: str = "") -> bool:
        """Count a request a peer replica (``router``, at wall time ``ts``) sent here (its
        prompt's blocks) as queued until ``deadline``, unless the worker already holds or has
        queued its last block (which chains all the others, so one such request stands for
        any number; of two announcements of one prompt the earlier, by ``(ts, router)``,
        stands for both, so that every replica orders them alike)."""
        if not hashes or hashes[-1] in self.blocks:
            return False
        entry = self.routed.get(hashes[-1])
        if entry is not None:
            if (ts, router) >= entry[2:]:
                return False
            self.routed[hashes[-1]] = (entry[0], entry[1], ts, router)
            return True
        if hashes[-1] in self.queued_blocks:
            return False
        self.routed[hashes[-1]] = (hashes, deadline, ts, router)
        self.queued_blocks.update(hashes)
        return True

    def unroute(self, last: int, now: float | None = None) -> None:
        """Forget the announcement ending in block ``last``: the engine queued its prompt
        (``now`` None), or it is past its deadline at ``now``."""
        entry = self.routed.get(last)
        if entry is not None and (now is None or entry[1] <= now):
            del self.routed[last]
            self.settle_blocks(entry[0])

    def routed_before(self, hashes: Sequence[int], ts: float, router: str) -> dict[int, int]:
        """The peers' announced requests here that came before one announced by ``router`` at
        ``ts`` (by time, then replica id: every replica orders two announcements alike) and
        share leading blocks with ``hashes``: {their last block: blocks shared}."""
        out = {}
        for last, (theirs, _, their_ts, their_router) in self.routed.items():
            if (their_ts, their_router) < (ts, router):
                shared = next((i for i, (a, b) in enumerate(zip(theirs, hashes)) if a != b), min(len(theirs), len(hashes)))
                if shared:
                    out[last] = shared
        return out

    def settle_blocks(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self.queued_blocks[h] -= 1
            if not self.queued_blocks[h]:
                del self.queued_blocks[h]

    def load_queued(self, queued: dict[str, list[int]]) -> None:
        self.queued = dict(queued)
        self.queued_blocks = Counter(h for hashes in queued.values() for h in hashes)
        for hashes, *_ in self.routed.values():
            self.queued_blocks.update(hashes)


class KVIndex:
    """Resident blocks per worker URL."""

    def __init__(self, stale_after: float = 5.0) -> None:
        self.stale_after = stale_after
        self.workers: dict[str, WorkerBlocks] = {}
        self._routed_expiry: list[tuple[float, str, int]] = []  # heap of (deadline, url, last block)

    def add_worker(self, url: str) -> WorkerBlocks:
        return self.workers.setdefault(url, WorkerBlocks(url))

    def remove_worker(self, url: str) -> None:
        self.workers.pop(url, None)

    def in_sync(self, url: str, now: float | None = None) -> bool:
        w = self.workers.get(url)
        if w is None or w.state != "live":
            return False
        return (time.monotonic() if now is None else now) - w.last_message <= self.stale_after

    # ---- input -----------------------------------------------------------------------------
    def on_message(self, url: str, batch: EventBatch, now: float | None = None) -> str | None:
        """Take one published message; return why a snapshot is needed now ("restart",
        "gap"), or None."""
        w = self.workers.get(url)
        if w is None:
            return None
        w.last_message = time.monotonic() if now is None else now
        if w.state == "syncing":
            w.buffered.append(batch)
            del w.buffered[:-_MAX_BUFFERED]
            return None
        if batch.engine != w.engine:
            return self._resync(w, batch, "restart")
        if batch.seq <= w.seq:  # a heartbeat, or a repeat
            return None
        if batch.seq > w.seq + 1 or not batch.events:  # skipped a message (a heartbeat past ours too)
            return self._resync(w, batch, "gap")
        w.apply(batch)
        return None

    def on_snapshot(self, url: str, snap: Snapshot, now: float | None = None) -> str | None:
        """Load a snapshot and replay what was buffered after it; return why another snapshot
        is needed ("gap", "restart"), or None when the worker is live."""
        w = self.workers.get(url)
        if w is None:
            return None
        w.engine, w.seq, w.block_size, w.seed = snap.engine, snap.seq, snap.block_size, snap.seed
        w.blocks = set(snap.blocks)
        w.load_queued(snap.queued)
        w.last_message = time.monotonic() if now is None else now
        pending, w.buffered = sorted((b for b in w.buffered if b.seq > snap.seq or b.engine != snap.engine),
                                     key=lambda b: b.seq), []
        for batch in pending:
            if batch.engine != snap.engine:
                return self._resync(w, batch, "restart")
            if batch.seq == w.seq + 1 and batch.events:
                w.apply(batch)
            elif batch.seq > w.seq:
                return self._resync(w, batch, "gap")
        w.state = "live"
        return None

    def mark_syncing(self, url: str) -> None:
        """Trust nothing of ``url`` until its next snapshot (e.g. its stream went quiet)."""
        w = self.workers.get(url)
        if w is not None and w.state == "live":
            w.state = "syncing"
            w.resyncs += 1

    def _resync(self, w: WorkerBlocks, batch: EventBatch, reason: str) -> str:
        w.state = "syncing"
        w.buffered = [batch]
        w.resyncs += 1
        return reason

    def peer_routed(self, url: str, hashes: list[int], ttl: float, now: float | None = None,
                    ts: float = 0.0, router: str = "") -> bool:
        """A router replica (``router``: a peer, or this one ordering its own requests, peers.py)
        sent ``url`` a request with these prompt blocks at wall time ``ts``: count them as queued
        there for up to ``ttl`` seconds (the engine's own ``queued`` event ends it sooner).
        False if ``url`` is not followed or already holds or has queued them."""
        w = self.workers.get(url)
        deadline = (time.monotonic() if now is None else now) + ttl
        if w is None or not w.route(hashes, deadline, ts, router):
            return False
        heapq.heappush(self._routed_expiry, (deadline, url, hashes[-1]))
        return True

    def expire_routed(self, now: float | None = None) -> None:
        """Forget the peers' announcements older than their ``ttl`` (the request failed, or its
        engine's event was lost: a resync does not replay ``queued`` for what was prefilled)."""
        now = time.monotonic() if now is None else now
        heap = self._routed_expiry
        while heap and heap[0][0] <= now:
            _, url, last = heapq.heappop(heap)
            w = self.workers.get(url)
            if w is not None:
                w.unroute(last, now)

    # ---- queries ----------------------------------------------------------------------------
    def resident_tokens(self, url: str) -> int | None:
        """Tokens (whole blocks) that the worker's cache holds or is about to hold (its queued
        requests' blocks), or None while it is not in sync."""
        if not self.in_sync(url):
            return None
        w = self.workers[url]
        coming = sum(1 for h in w.queued_blocks if h not in w.blocks)
        return (len(w.blocks) + coming) * w.block_size

    def matched_tokens(self, urls: Sequence[str], token_ids: Sequence[int],
                       hashes: dict[tuple[int, int], list[int]] | None = None,
                       queued: bool = False) -> dict[str, int]:
        """For each in-sync worker of ``urls``: how many leading tokens of ``token_ids`` it
        holds, in whole blocks (the last token never counts: the engine always computes it);
        with ``queued``, or is about to hold: a block that a queued request's prompt has counts
        too (hashes are chained, so one queued prompt that shares the first ``k`` blocks holds
        them all). ``hashes``: the block hashes of ``token_ids`` already computed, by
        ``(block_size, seed)`` (``block_hashes``); those computed here are added to it for
        the caller."""
        hashes = {} if hashes is None else hashes
        now = time.monotonic()
        out = {}
        for url in urls:
            if not self.in_sync(url, now):
                continue
            w = self.workers[url]
            n = 0
            coming = w.queued_blocks if queued else ()
            for h in block_hashes(token_ids, w.block_size, w.seed, hashes):
                if h not in w.blocks and h not in coming:
                    break
                n += 1
            out[url] = n * w.block_size
        return out


def block_hashes(token_ids: Sequence[int], block_size: int, seed: int,
                 computed: dict[tuple[int, int], list[int]]) -> list[int]:
    """The hashes of the full blocks of ``token_ids`` but its last token (which the engine
    always computes, so no block holding it is ever matched), taken from ``computed`` or
    hashed once and kept there."""
    key = (block_size, seed)
    if key not in computed:
        computed[key] = kv_events.prompt_hashes(token_ids, block_size, seed)
    return computed[key]
