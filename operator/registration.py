"""Keep every router's worker list equal to the set of Ready endpoints (level-based).

Run on every pod event and on a timer. A router that lost workers it had (a restart:
its list starts empty) is reported and rebuilt by the same diff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from radixfleet.operator.router_client import RouterClient, RouterError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    add: tuple[str, ...]
    remove: tuple[str, ...]


def events_endpoint(url: str, port: int) -> str | None:
    """``tcp://<worker host>:<port>`` for worker ``url`` (http://host:port), or None when off."""
    if not port:
        return None
    host = url.split("://", 1)[-1].rsplit(":", 1)[0]
    return f"tcp://{host}:{port}"


def plan(desired: Iterable[str], actual: Iterable[str]) -> Plan:
    desired, actual = set(desired), set(actual)
    return Plan(add=tuple(sorted(desired - actual)), remove=tuple(sorted(actual - desired)))


@dataclass
class SyncResult:
    """What one sync did across all routers; `errors` are per-router messages."""

    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    registered: set[str] = field(default_factory=set)  # on every reachable router
    routers_ok: int = 0
    restarted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# router base URL -> the workers it had after our last sync (for restart detection)
RouterMemory = dict[str, set[str]]


async def sync_routers(
    routers: Iterable[str],
    desired: set[str],
    memory: RouterMemory,
    client_for: Callable[[str], RouterClient],
    kv_events_port: int = 0,
) -> SyncResult:
    """``kv_events_port``: where each engine publishes its KV events (on its pod IP, the
    worker URL's host), sent along with ``add_worker``; 0: none."""
    result = SyncResult()
    registered: set[str] | None = None
    for base in routers:
        client = client_for(base)
        try:
            actual = await client.list_workers()
            known = memory.get(base, set())
            if (known & desired) - actual:
                result.restarted.append(base)  # lost workers we registered: it restarted
            p = plan(desired, actual)
            for url in p.remove:
                await client.remove_worker(url)
                log.info("router %s: removed worker %s", base, url)
            for url in p.add:
                await client.add_worker(url, events_endpoint(url, kv_events_port))
                log.info("router %s: added worker %s", base, url)
            result.added |= set(p.add)
            result.removed |= set(p.remove)
            memory[base] = set(desired)
            result.routers_ok += 1
            registered = set(desired) if registered is None else registered & desired
        except RouterError as e:
            result.errors.append(str(e))
        finally:
            await client.close()
    result.registered = registered or set()
    for gone in set(memory) - set(routers):
        del memory[gone]
    return result
