"""``--policy`` name → policy class."""

from __future__ import annotations

from collections.abc import Callable

from ..config import RouterConfig
from .base import Policy
from .cache_aware import CacheAwarePolicy
from .precise import PrecisePolicy, make_auto
from .simple import PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy

POLICIES: dict[str, Callable[[RouterConfig], Policy]] = {
    "auto": make_auto,
    "precise": PrecisePolicy,
    "cache_aware": CacheAwarePolicy,
    "round_robin": RoundRobinPolicy,
    "random": RandomPolicy,
    "power_of_two": PowerOfTwoPolicy,
}


def make_policy(config: RouterConfig) -> Policy:
    """Build the policy named by ``config.policy``."""
    return POLICIES[config.policy](config)
