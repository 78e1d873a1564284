"""Routing policies (the simple ones; ``cache_aware.py`` holds the cache-aware one).

A policy picks one worker among the available candidates for a request's text key. It is
called on the event loop thread only; ``select`` must be fast (it is on the hot path) and
never block. ``policy_registry.POLICIES`` maps a ``--policy`` name to a policy class.
"""

from __future__ import annotations

import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence

from .config import RouterConfig
from .worker import Worker


class Policy(ABC):
    """Chooses a worker; may keep per-worker state (added/removed with the membership)."""

    name: str = ""

    @abstractmethod
    def select(self, candidates: Sequence[Worker], text: str) -> tuple[Worker, str]:
        """Return the chosen worker and a decision label ("" when the policy has none).

        ``candidates`` is non-empty; ``text`` is the request's routing key ("" if none).
        """

    def add_worker(self, url: str) -> None:
        """A worker joined."""
        return None

    def remove_worker(self, url: str) -> None:
        """A worker left: forget everything about it."""
        return None

    def maintain(self) -> None:
        """Periodic housekeeping (cache_aware: LRU eviction). May run in a worker thread."""
        return None

    def forget_cache(self) -> None:
        """The workers flushed their caches (cache_aware: clear every tree)."""
        return None

    def stats(self) -> dict[str, int]:
        """Per-worker figures worth exporting (cache_aware: tree sizes)."""
        return {}


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self, config: RouterConfig) -> None:
        self._counter = itertools.count()

    def select(self, candidates: Sequence[Worker], text: str) -> tuple[Worker, str]:
        return candidates[next(self._counter) % len(candidates)], ""


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, config: RouterConfig) -> None:
        self._rng = random.Random()

    def select(self, candidates: Sequence[Worker], text: str) -> tuple[Worker, str]:
        return self._rng.choice(candidates), ""


class PowerOfTwoPolicy(Policy):
    """Sample two workers at random, take the one with fewer requests in flight."""

    name = "power_of_two"

    def __init__(self, config: RouterConfig) -> None:
        self._rng = random.Random()

    def select(self, candidates: Sequence[Worker], text: str) -> tuple[Worker, str]:
        if len(candidates) == 1:
            return candidates[0], ""
        a, b = self._rng.sample(candidates, 2)
        return (a if a.in_flight <= b.in_flight else b), ""
