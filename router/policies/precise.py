"""The precise policy: route on what each worker's radix cache really holds.

The router tokenizes the request as the engine will (``prompt_tokens.py``), hashes its
blocks (``radixfleet/kv_events.py``) and asks the event-fed index (``kv_index.py``) how many
leading tokens each worker holds. Cost of sending the request to worker ``w``::

    cost(w) = (prompt_tokens - cached(w)) + pending_prefill(w) + load_tokens * in_flight(w)

the prompt tokens ``w`` would have to compute for this request, plus those it still has to
compute for the requests this router sent it whose answers have not started (their
uncached tokens when routed), plus ``load_tokens`` (default 32, about one decode step's
worth) for every request it is serving: an estimate of the time to the first token, in
prefill tokens. The cheapest worker wins, ties go to the less loaded, then by rotation. ``cached(w)`` comes from the events while ``w`` is in sync; for a worker whose
events are late or broken (until it has resynchronised) it is estimated from the
cache_aware approximate tree: the matched fraction of the request text times
``prompt_tokens``. Every request's text also goes into the chosen worker's tree, so the
fallback is always warm.

Decisions (metric ``routing_decisions_total{policy="precise"}``): ``cached`` (events say
the chosen worker holds part of the prompt), ``uncached`` (none holds any), ``approximate``
(the chosen worker was scored by its tree). ``predicted`` on the key is ``cached(w)`` of an
events-scored choice, which the proxy compares with the engine's reported ``cached_tokens``.

``auto`` (the default ``--policy``) is this policy when the tokenizer is loaded and every
candidate is in sync, and exactly cache_aware otherwise. Until a tokenizer is loaded
(``tokenizer_path``, else fetched from the first worker that publishes), requests are
routed by text, as cache_aware.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..config import RouterConfig
from ..kv_index import KVIndex
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


class PrecisePolicy(Policy):
    name = "precise"

    def __init__(self, config: RouterConfig, auto: bool = False) -> None:
        self.auto = auto
        self.load_tokens = config.load_tokens
        self.approx = CacheAwarePolicy(config)
        self.index = KVIndex(config.kv_events_stale_after)
        self.tokenizer: PromptTokenizer | None = None
        if config.tokenizer_path:  # else fetched from the first publishing worker (kv_subscriber.py)
            self.tokenizer = PromptTokenizer(config.tokenizer_path, config.chat_template or None)
        self._decided = self.name
        self._rotation = itertools.count()
        # Applies the KV-event messages already received (kv_subscriber.py); set by the app.
        self.sync_events: Callable[[], None] = lambda: None

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
            text.predicted, text.uncached = None, 0
        urls = [w.url for w in candidates]
        if ids:
            self.sync_events()
        matched = self.index.matched_tokens(urls, ids) if ids else {}
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
        best = min(range(len(order)), key=lambda i: (
            n - cached[order[i].url] + order[i].pending_prefill + self.load_tokens * order[i].in_flight,
            order[i].in_flight, i))
        chosen = order[best]
        if isinstance(text, PromptKey):
            text.uncached = n - cached[chosen.url]
        if text:
            self.approx._tree_for(chosen.url).insert(text)
        if chosen.url not in matched:
            decision = "approximate"
        else:
            decision = "cached" if matched[chosen.url] else "uncached"
            if isinstance(text, PromptKey):
                text.predicted = matched[chosen.url]
        return chosen, decision


def make_auto(config: RouterConfig) -> PrecisePolicy:
    policy = PrecisePolicy(config, auto=True)
    policy.name = "auto"
    return policy
