"""The cache-aware policy: prefix affinity when load is balanced, shortest queue when not.

Decision rule, on the in-flight counts of the candidates:

- imbalanced when ``max - min > balance_abs_threshold`` and ``max > balance_rel_threshold *
  min``: route to the least-loaded worker (decision ``imbalanced``);
- otherwise find the worker whose tree shares the longest prefix with the request text; if
  ``matched / len(text) > cache_threshold`` route there (``hit``), else to the worker with
  the smallest tree, i.e. the most spare cache (``miss``).

In every case the text is then inserted into the chosen worker's tree, so the next request
with the same prefix follows it. Ties are broken by load, then by rotation, so that idle
workers with empty trees share the first requests.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from ..config import RouterConfig
from ..worker import Worker
from .base import Policy
from .radix_tree import RadixTree

log = logging.getLogger(__name__)


class CacheAwarePolicy(Policy):
    name = "cache_aware"

    def __init__(self, config: RouterConfig) -> None:
        self.cache_threshold = config.cache_threshold
        self.balance_abs_threshold = config.balance_abs_threshold
        self.balance_rel_threshold = config.balance_rel_threshold
        self.max_tree_size = config.max_tree_size
        self.trees: dict[str, RadixTree] = {}
        self._rotation = itertools.count()

    def add_worker(self, url: str) -> None:
        self.trees.setdefault(url, RadixTree())

    def remove_worker(self, url: str) -> None:
        self.trees.pop(url, None)

    def is_imbalanced(self, loads: Sequence[int]) -> bool:
        """The imbalance switch: both the absolute and the relative thresholds are exceeded."""
        hi, lo = max(loads), min(loads)
        return hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo

    def select(self, candidates: Sequence[Worker], text: str) -> tuple[Worker, str]:
        n = len(candidates)
        offset = next(self._rotation) % n
        order = list(candidates[offset:]) + list(candidates[:offset])
        trees = [self.trees.get(w.url) or self._tree_for(w.url) for w in order]
        if n > 1 and self.is_imbalanced([w.in_flight for w in order]):
            idx = min(range(n), key=lambda i: order[i].in_flight)
            decision = "imbalanced"
        else:
            matched = [t.match(text) for t in trees] if text else [0] * n
            idx = max(range(n), key=lambda i: (matched[i], -order[i].in_flight))
            if text and matched[idx] / len(text) > self.cache_threshold:
                decision = "hit"
            else:
                idx = min(range(n), key=lambda i: (trees[i].size, order[i].in_flight))
                decision = "miss"
        if text:
            trees[idx].insert(text)
        return order[idx], decision

    def maintain(self) -> None:
        for url, tree in list(self.trees.items()):
            freed = tree.evict(self.max_tree_size)
            if freed:
                log.info("evicted %d characters from the tree of %s", freed, url)

    def forget_cache(self) -> None:
        for tree in self.trees.values():
            tree.clear()

    def stats(self) -> dict[str, int]:
        return {url: tree.size for url, tree in self.trees.items()}

    def _tree_for(self, url: str) -> RadixTree:
        return self.trees.setdefault(url, RadixTree())
