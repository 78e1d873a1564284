"""One upstream worker as the router sees it: URL, load, health and circuit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from .circuit_breaker import CircuitBreaker


class InvalidWorkerURL(ValueError):
    """A worker URL the router cannot use (answered with 400)."""


def normalize_url(url: str) -> str:
    """``http(s)://host[:port]`` without a trailing slash; raises InvalidWorkerURL otherwise."""
    url = url.strip()
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise InvalidWorkerURL(f"Invalid worker URL {url!r}: {e}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidWorkerURL(f"Invalid worker URL {url!r}: expected http://host:port")
    if parsed.query or parsed.fragment or parsed.path not in ("", "/"):
        raise InvalidWorkerURL(f"Invalid worker URL {url!r}: no path or query allowed")
    return url.rstrip("/")


def check_endpoint(endpoint: str, schemes: Sequence[str] = ("tcp",), what: str = "KV-event endpoint") -> str:
    """A ``scheme://host:port`` ZMQ endpoint (KV events: ``tcp``; router peers: ``tcp`` or
    ``dns``), with the host:port rules of worker URLs; ValueError otherwise."""
    scheme, sep, host_port = endpoint.partition("://")
    expected = " or ".join(f"{s}://host:port" for s in schemes)
    if not sep or scheme not in schemes or not host_port.rsplit(":", 1)[-1].isdigit():
        raise ValueError(f"{what} {endpoint!r} must be {expected}")
    try:
        normalize_url("http://" + host_port)
    except InvalidWorkerURL:
        raise ValueError(f"{what} {endpoint!r} must be {expected}") from None
    return endpoint


@dataclass(eq=False)
class Worker:
    """Mutable state of one worker; only the event loop thread mutates it."""

    url: str
    breaker: CircuitBreaker
    in_flight: int = 0
    pending_prefill: int = 0  # prompt tokens sent to it, not yet cached there, whose answer has not started (precise)
    # Token ids of the requests this router sent it that have not finished (precise): the engine
    # caches a prompt once prefilled, before any event can say so, so these prefixes are held
    # there or about to be.
    prompts_in_flight: dict[int, Sequence[int]] = field(default_factory=dict)
    consecutive_failures: int = 0  # requests and health checks; reaching the limit removes it
    healthy: bool = True  # last health check passed
    removed: bool = field(default=False)

    def available(self) -> bool:
        """May take a new request: not removed and its circuit lets it through."""
        return not self.removed and self.breaker.available()
