"""The precise policy: route on what each worker's radix cache really holds.

The router tokenizes the request as the engine will (``prompt_tokens.py``), hashes its
blocks (``radixfleet/kv_events.py``) and asks the event-fed index (``kv_index.py``) how many
leading tokens each worker holds, ``cached(w)``. Then, with ``n`` prompt tokens:

1. load imbalanced (cache_aware's test on requests in flight: ``max - min >
   balance_abs_threshold`` and ``max > balance_rel_threshold * min``): decision
   ``imbalanced``, the worker holding the most (``ahead(w)``, below) among those with room
   (fewer than ``balance_abs_threshold`` requests more than the least loaded) if it holds
   more than ``cache_threshold * n``, else the least-loaded worker (``_rebalance``);
2. else, if the worker holding the most, ``ahead(w)``, holds more than ``cache_threshold *
   n``: that worker (``cached``; ties by cost). ``ahead(w)`` is ``cached(w)`` or, if longer,
   the prefix ``w`` is about to hold: the longest (whole blocks) that the request shares with
   a request ``w`` has received and not yet prefilled (its ``queued`` events, which every
   replica sees) or with one this router sent ``w`` and that has not finished (known at
   once, before the request reaches ``w``). The engine caches a prompt once it is
   prefilled, and a request sharing it that arrives meanwhile waits a step for it: without
   this, requests on one new context sent at once go one to each worker, and each worker
   computes and holds a copy (measured: ``--workload shared-context``, README); and a router
   replica that did not send the first would predict none of it cached;
3. else the cheapest worker by the cost::

       cost(w) = uncached_weight * (n - ahead(w)) + pending_prefill(w) + load_tokens * in_flight(w)

   the prompt tokens ``w`` would compute for this request, plus those it still owes the
   requests this router sent it whose answers have not started (their uncached tokens when
   routed), plus ``load_tokens`` (default 32, about one decode step) per request it serves:
   an estimate of the time to the first token in prefill tokens (``uncached``). The tokens
   this request must compute count twice by default (``uncached_weight`` 2): once as its own
   wait, once as the work it puts in front of the worker's next requests and the copy it
   adds to the fleet's caches. With weight 1 the
   cost is this request's wait alone, and it moves a partly cached prompt to a worker that
   holds none of it whenever that worker's queue is shorter by more than the held part: the
   held part is then computed a second time and held twice, which costs the whole fleet
   compute and KV space (measured under eviction: README). Ties go to the less loaded, then
   by rotation. A new prefix, one that no worker holds more of than another, is placed
   instead by ``_place``: the first worker in the rendezvous-hash order of its first blocks
   among those near the cheapest and not holding far more than the emptiest, so that router
   replicas, which see the same events but each only its own load, place it alike.

Following a held prefix in step 2 also keeps a conversation's later turns there, which a
purely greedy cost would trade away for a moment's lower load (measured:
``benchmarks/routing_quality.py``, README). ``cached(w)`` comes from the events while ``w``
is in sync; for a worker whose events are late or broken (until it has resynchronised) it
is estimated from the cache_aware approximate tree: the matched fraction of the request
text times ``n`` (decision ``approximate`` when such a worker is chosen). Every request's
text also goes into the chosen worker's tree, so the fallback is always warm. ``predicted``
on the key is ``ahead(w)`` of an events-scored choice, which the proxy compares with the
engine's reported ``cached_tokens``.

With router peers (``--peer-port``, ``--peers``), every events-scored choice is announced to
the other replicas, which count it as queued on the chosen worker at once; and, before
sending, replicas that routed requests sharing a new prompt at the same moment agree which
goes first (``--peer-hold``; ``before_send``, ``peers.py``).

``auto`` (the default ``--policy``) is this policy when the tokenizer is loaded and every
candidate is in sync, and exactly cache_aware otherwise. Until a tokenizer is loaded
(``tokenizer_path``, else fetched from the first worker that publishes), requests are
routed by text, as cache_aware.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from radixfleet import kv_events

from ..config import RouterConfig
from ..kv_index import KVIndex, block_hashes
from ..peers import PeerRoutes
from ..prompt_tokens import PromptTokenizer
from ..worker import Worker
from .base import Policy
from .cache_aware import CacheAwarePolicy
from .text_key import text_key

log = logging.getLogger(__name__)


class PromptKey(str):
    """The request text (what cache_aware keys on) carrying its prompt token ids, and after
    ``select`` the predicted cached tokens of an events-scored choice."""

    ids: list[int] | None = None
    predicted: int | None = None
    uncached: int = 0  # prompt tokens the chosen worker must compute (its pending_prefill share)
    # Set when the choice was announced to the router peers: (time, the prompt's blocks, no worker held it).
    announced: tuple[float, list[int], bool] | None = None


class PrecisePolicy(Policy):
    name = "precise"

    def __init__(self, config: RouterConfig, auto: bool = False) -> None:
        self.auto = auto
        self.load_tokens = config.load_tokens
        self.uncached_weight = config.uncached_weight
        self.cache_threshold = config.cache_threshold
        self.placement_tolerance = config.placement_tolerance
        self.placement_blocks = config.placement_blocks
        self.approx = CacheAwarePolicy(config)
        self.index = KVIndex(config.kv_events_stale_after)
        self.tokenizer: PromptTokenizer | None = None
        if config.tokenizer_path:  # else fetched from the first publishing worker (kv_subscriber.py)
            self.tokenizer = PromptTokenizer(config.tokenizer_path, config.chat_template or None)
        self._decided = self.name
        self._rotation = itertools.count()
        # Applies the KV-event messages (kv_subscriber.py) and peer announcements (peers.py)
        # already received; set by the app.
        self.sync_events: Callable[[], None] = lambda: None
        # The other router replicas (peers.py), told where each prompt's blocks go; set by the app.
        self.peers: PeerRoutes | None = None

    # ---- membership and housekeeping: the tree and the index follow the workers -------------
    def add_worker(self, url: str) -> None:
        self.approx.add_worker(url)

    def remove_worker(self, url: str) -> None:
        self.approx.remove_worker(url)
        self.index.remove_worker(url)

    def maintain(self) -> None:
        self.approx.maintain()

    def forget_cache(self) -> None:
        self.approx.forget_cache()

    def stats(self) -> dict[str, int]:
        return self.approx.stats()

    # ---- routing ---------------------------------------------------------------------------
    def decided_by(self) -> str:
        return self._decided

    def routing_key(self, route: str, body: Any) -> str:
        key = PromptKey(text_key(route, body))
        if self.tokenizer is not None:
            key.ids = self.tokenizer.token_ids(route, body)
        return key

    def select(self, candidates: Sequence[Worker], text: str) -> tuple[Worker, str]:
        ids = getattr(text, "ids", None)
        if isinstance(text, PromptKey):
            text.predicted, text.uncached, text.announced = None, 0, None
        urls = [w.url for w in candidates]
        if ids:
            self.sync_events()
        hashes: dict[tuple[int, int], list[int]] = {}  # the prompt's block hashes, hashed once
        matched = self.index.matched_tokens(urls, ids, hashes, queued=True) if ids else {}
        if not ids or (self.auto and len(matched) < len(candidates)):
            self._decided = self.approx.name
            return self.approx.select(candidates, text)
        self._decided = "precise"
        n = len(ids)
        offset = next(self._rotation) % len(candidates)
        order = list(candidates[offset:]) + list(candidates[:offset])
        cached = {}
        for w in order:
            if w.url in matched:
                cached[w.url] = matched[w.url]
            else:  # events late or broken: the approximate tree's guess
                tree = self.approx.trees.get(w.url)
                chars = tree.match(text) if tree is not None and text else 0
                cached[w.url] = int(n * chars / len(text)) if text else 0
        # What each worker holds or is about to hold (``matched`` counts its queued requests'
        # blocks): a request this router sent it that has not finished leaves its prompt in
        # the cache when it is prefilled, and the worker may not have reported it queued yet.
        ahead = {w.url: max(cached[w.url], self._in_flight_prefix(w, ids)) for w in order}
        costs = [self.uncached_weight * (n - ahead[w.url]) + w.pending_prefill + self.load_tokens * w.in_flight
                 for w in order]
        tie = range(len(order))
        if len(order) > 1 and self.approx.is_imbalanced([w.in_flight for w in order]):
            best, rule = self._rebalance(order, ahead, costs, n), "imbalanced"
        else:
            best = max(tie, key=lambda i: (ahead[order[i].url], -costs[i], -i))
            rule = "cached"
            if ahead[order[best].url] <= self.cache_threshold * n:
                rule = "uncached"
                if max(ahead.values()) == min(ahead.values()):  # a new prefix: no one holds more
                    best = self._place(order, costs, ids, ahead[order[0].url], hashes)
                else:
                    best = min(tie, key=lambda i: (costs[i], order[i].in_flight, i))
        chosen = order[best]
        if isinstance(text, PromptKey):
            text.uncached = n - ahead[chosen.url]
        if text:
            self.approx._tree_for(chosen.url).insert(text)
        decision = rule if chosen.url in matched else "approximate"
        if chosen.url in matched and isinstance(text, PromptKey):
            text.predicted = ahead[chosen.url]
            if self.peers is not None:
                state = self.index.workers[chosen.url]
                chain = block_hashes(ids, state.block_size, state.seed, hashes)
                ts = self.peers.announce(chosen.url, chain)
                if ts is not None:  # "placed": the choice did not follow a prefix held there
                    text.announced = (ts, chain, ahead[chosen.url] <= self.cache_threshold * n)
        return chosen, decision

    async def before_send(self, worker: Worker, text: str) -> None:
        announced = getattr(text, "announced", None)
        if self.peers is not None and announced is not None:
            ts, chain, placed = announced
            await self.peers.agree(worker.url, chain, ts, placed, text)

    def _rebalance(self, order: Sequence[Worker], ahead: dict[str, int], costs: list[float], n: int) -> int:
        """The choice while the load is imbalanced (the index into ``order``): the worker that
        really holds the most of the prompt among those with room, i.e. fewer than
        ``balance_abs_threshold`` requests in flight more than the least loaded (one more
        request leaves them within the threshold), if it holds more than ``cache_threshold *
        n``; else the least loaded. cache_aware takes the least loaded whatever it holds, which
        recomputes a hot prefix there while a worker with room still holds it."""
        lo = min(w.in_flight for w in order)
        room = [i for i in range(len(order)) if order[i].in_flight < lo + self.approx.balance_abs_threshold]
        least = min(range(len(order)), key=lambda i: (order[i].in_flight, costs[i], i))
        holder = max(room or [least], key=lambda i: (ahead[order[i].url], -costs[i], -i))
        return holder if ahead[order[holder].url] > self.cache_threshold * n else least

    def _place(self, order: Sequence[Worker], costs: list[float], ids: Sequence[int], held: int,
               hashes: dict[tuple[int, int], list[int]]) -> int:
        """Where a new prefix goes (the index into ``order``), one that no worker holds more of
        than the others (``held`` tokens each): among the workers within
        ``placement_tolerance * n`` of the cheapest cost, and among those within ``max(n,
        10 %)`` of the fewest resident tokens by the events, the first in the rendezvous order
        of the prompt's placement key (its first blocks past ``held``). Replicas see the same
        events and hash the same key, and the tolerance absorbs the load each sees only its
        own share of, so the requests on a new prefix sent at once through different replicas
        go to one worker; the cheapest by each replica's cost would send them to several."""
        n = len(ids)
        floor = min(costs)
        near = [i for i in range(len(order)) if costs[i] <= floor + self.placement_tolerance * n]
        resident = {i: self.index.resident_tokens(order[i].url) for i in near}
        known = [r for r in resident.values() if r is not None]
        if known:
            limit = min(known) + max(n, 0.1 * max(known))
            near = [i for i in near if resident[i] is None or resident[i] <= limit]
        key = self._placement_key(order, ids, held, hashes)
        if key is None or len(near) == 1:
            return min(near, key=lambda i: (costs[i], order[i].in_flight, i))
        return max(near, key=lambda i: _rendezvous(key, order[i].url))

    def _placement_key(self, order: Sequence[Worker], ids: Sequence[int], held: int,
                       hashes: dict[tuple[int, int], list[int]]) -> bytes | None:
        """The hash of the prompt's first ``placement_blocks`` blocks past the ``held`` prefix
        (so that a system prompt every worker holds does not send every tenant to one
        worker), or of all its full blocks but the last token's if fewer; None without one.
        ``hashes``: the prompt's block hashes that ``matched_tokens`` computed (reused)."""
        state = next((self.index.workers[w.url] for w in order if w.url in self.index.workers), None)
        block, seed = (state.block_size, state.seed) if state else (kv_events.DEFAULT_BLOCK_SIZE, kv_events.SEED)
        chain = block_hashes(ids, block, seed, hashes)
        blocks = min(held // block + self.placement_blocks, len(chain))
        if blocks < 1:
            return None
        return chain[blocks - 1].to_bytes(8, "little")

    def _in_flight_prefix(self, worker: Worker, ids: Sequence[int]) -> int:
        """The longest prefix of ``ids`` (whole blocks, never the last token) that a request
        in flight on ``worker`` shares."""
        if not worker.prompts_in_flight:
            return 0
        state = self.index.workers.get(worker.url)
        block = state.block_size if state is not None else 1
        usable = list(ids[:len(ids) - 1])
        best = max(_shared_prefix(usable, other) for other in worker.prompts_in_flight.values())
        return best - best % block


def _shared_prefix(a: list[int], b: Sequence[int]) -> int:
    """Length of the common prefix of ``a`` and ``b``: a binary search on list equality (C
    comparisons) rather than a Python loop over the tokens, which per routed request and
    request in flight would cost milliseconds at a few thousand tokens."""
    lo, hi = 0, min(len(a), len(b))
    b = list(b[:hi])
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _rendezvous(key: bytes, url: str) -> int:
    """Highest-random-weight hashing: every replica ranks the workers for ``key`` alike, and
    removing a worker moves only the keys it ranked first."""
    return int.from_bytes(hashlib.blake2b(key + url.encode(), digest_size=8).digest(), "little")


def make_auto(config: RouterConfig) -> PrecisePolicy:
    policy = PrecisePolicy(config, auto=True)
    policy.name = "auto"
    return policy
