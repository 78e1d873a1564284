"""The routing-policy interface.

A policy picks one worker among the available candidates for a request's text key
(``text_key.py``). It is called on the event loop thread only; ``select`` must be fast (it
is on the hot path) and never block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from ..worker import Worker
from .text_key import text_key


class Policy(ABC):
    """Chooses a worker; may keep per-worker state (added/removed with the membership)."""

    name: str = ""

    @abstractmethod
    def select(self, candidates: Sequence[Worker], text: str) -> tuple[Worker, str]:
        """Return the chosen worker and a decision label ("" when the policy has none).

        ``candidates`` is non-empty; ``text`` is the request's routing key ("" if none).
        """

    async def before_send(self, worker: Worker, text: str) -> None:
        """Called after ``select`` chose ``worker`` for ``text``, before the request goes out
        (precise with router peers: agree with the other replicas on the order; peers.py)."""
        return None

    def routing_key(self, route: str, body: Any) -> str:
        """What ``select`` gets for a request to ``route`` with JSON ``body``: its text key."""
        return text_key(route, body)

    def decided_by(self) -> str:
        """The policy that made the last ``select``'s choice (``auto`` delegates)."""
        return self.name

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
