"""Admission control: per-key token buckets, then a bounded, timed waiting queue for slots.

In the order a request meets them (``Proxy.forward``):

1. **Per-key limits** (``rate_limit_rps``, ``rate_limit_tokens_per_s``; off by default). The
   key is the bearer token the client sent (all requests without one share a bucket); only
   a hash of it is kept. Each key has a request bucket (``rate_limit_burst`` requests,
   refilled at ``rate_limit_rps``) and a token bucket (``rate_limit_token_burst`` tokens,
   refilled at ``rate_limit_tokens_per_s``), a request costing its prompt tokens (the
   precise policy's count, else characters / 4) plus the ``max_tokens`` it asks for. Short
   of either: 429 at once with ``Retry-After`` = seconds until the bucket holds enough.
2. **Slots.** At most ``queue_limit`` requests are in flight to the workers. Past it, up to
   ``max_waiting`` requests wait in FIFO order for a slot, each for at most
   ``queue_timeout`` seconds: a full queue is a 429, a wait that times out a 408, both with
   ``Retry-After`` = the expected wait (recent request duration x requests ahead / slots,
   at least 1 s). A client that disconnects while waiting leaves the queue at once.

Slot invariant: ``used`` counts requests holding a slot; a released slot goes straight to
the oldest waiter (``used`` unchanged) or is freed. Event-loop thread only.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .config import RouterConfig

_MAX_KEYS = 10_000  # buckets kept; the least recently used beyond it are dropped (they refill anyway)
_EWMA = 0.1


@dataclass
class Refusal:
    status: int
    reason: str  # metric label: queue_full, queue_timeout, rate_limited, client_cancelled
    message: str
    retry_after: int | None = None


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second."""

    __slots__ = ("rate", "capacity", "level", "stamp")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity, self.level, self.stamp = rate, capacity, capacity, now

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` and return 0, or take nothing and return the seconds until it could."""
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if amount <= self.level:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


def key_id(authorization: str | None) -> str:
    """A stable id of the client's key that never holds the key itself."""
    return hashlib.blake2b((authorization or "").encode(), digest_size=8).hexdigest()


class Admission:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.used = 0
        self.waiting: deque[asyncio.Future] = deque()
        self.mean_duration = 1.0  # seconds, EWMA of recent requests (for Retry-After)
        self._buckets: OrderedDict[str, tuple[TokenBucket | None, TokenBucket | None]] = OrderedDict()

    # ---- per-key limits ------------------------------------------------------------------------
    def check_rate(self, authorization: str | None, tokens: int) -> Refusal | None:
        c = self.config
        if not (c.rate_limit_rps or c.rate_limit_tokens_per_s):
            return None
        now = time.monotonic()
        kid = key_id(authorization)
        if kid not in self._buckets:
            self._buckets[kid] = (
                TokenBucket(c.rate_limit_rps, c.rate_limit_burst or max(1.0, c.rate_limit_rps), now) if c.rate_limit_rps else None,
                TokenBucket(c.rate_limit_tokens_per_s, c.rate_limit_token_burst or c.rate_limit_tokens_per_s, now)
                if c.rate_limit_tokens_per_s else None)
            while len(self._buckets) > _MAX_KEYS:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(kid)
        requests, token_bucket = self._buckets[kid]
        if token_bucket is not None and tokens > token_bucket.capacity:
            return Refusal(429, "rate_limited", f"The request needs {tokens} tokens, more than this key's "
                                                f"bucket holds ({token_bucket.capacity:g}); send a smaller one")
        wait = requests.take(1, now) if requests is not None else 0.0
        if wait:
            return Refusal(429, "rate_limited", f"Rate limit of {c.rate_limit_rps:g} requests/s for this key "
                                                "reached; retry later", _seconds(wait))
        if token_bucket is not None:
            wait = token_bucket.take(tokens, now)
            if wait:
                if requests is not None:
                    requests.give_back(1)
                return Refusal(429, "rate_limited", f"Token rate limit of {c.rate_limit_tokens_per_s:g} tokens/s "
                                                    "for this key reached; retry later", _seconds(wait))
        return None

    # ---- slots -----------------------------------------------------------------------------------
    async def acquire(self, receive: Callable[[], Awaitable[dict]] | None) -> tuple[Refusal | None, float]:
        """Take a slot, waiting if need be; (refusal or None, seconds waited). ``receive`` is
        the request's ASGI receive (its body already read): it returns when the client goes away."""
        limit = self.config.queue_limit
        if not limit or (self.used < limit and not self.waiting):
            self.used += 1
            return None, 0.0
        if len(self.waiting) >= self.config.max_waiting:
            ahead = f" and {len(self.waiting)} waiting" if self.waiting else ""
            return Refusal(429, "queue_full", f"Too many requests in flight ({self.used} >= queue limit {limit}{ahead}); "
                                              "retry later", self._expected_wait()), 0.0
        slot = asyncio.get_running_loop().create_future()
        self.waiting.append(slot)
        start = time.monotonic()
        disconnected = asyncio.ensure_future(_until_disconnect(receive)) if receive is not None else None
        waits = [slot] + ([disconnected] if disconnected is not None else [])
        try:
            await asyncio.wait(waits, timeout=self.config.queue_timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the handler itself was cancelled
            self._abandon(slot)
            raise
        finally:
            if disconnected is not None and not disconnected.done():
                disconnected.cancel()
        waited = time.monotonic() - start
        gone = disconnected is not None and disconnected.done()
        if slot.done() and not gone:
            return None, waited
        self._abandon(slot)
        if gone:
            return Refusal(499, "client_cancelled", "The client went away while waiting for a slot"), waited
        return Refusal(408, "queue_timeout", f"No slot freed up within the queue timeout of "
                                             f"{self.config.queue_timeout:g} s; retry later", self._expected_wait()), waited

    def release(self, duration: float) -> None:
        """A request holding a slot finished after ``duration`` seconds."""
        self.mean_duration += _EWMA * (duration - self.mean_duration)
        self._pass_on()

    def _pass_on(self) -> None:
        while self.waiting:
            slot = self.waiting.popleft()
            if not slot.done():
                slot.set_result(True)  # the slot passes to the oldest waiter
                return
        self.used -= 1

    def _abandon(self, slot: asyncio.Future) -> None:
        """A waiter leaves: out of the queue, and a slot it was already given goes on."""
        if slot.done() and not slot.cancelled():
            self._pass_on()
            return
        slot.cancel()
        try:
            self.waiting.remove(slot)
        except ValueError:
            pass

    def _expected_wait(self) -> int:
        slots = max(self.config.queue_limit, 1)
        return _seconds(self.mean_duration * (len(self.waiting) + 1) / slots)


async def _until_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))
