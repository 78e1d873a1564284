"""The policies that keep no per-request state: round_robin, random, power_of_two."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from ..config import RouterConfig
from ..worker import Worker
from .base import Policy


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
