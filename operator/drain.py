"""Scale-down without dropping requests: take the victims out of every router first,
wait until the routers count no in-flight requests on them (or a grace timeout), and
only then let the workload shrink.

Single-node: the victim pods get the `draining` annotation (never re-registered) and a
low `pod-deletion-cost`, so the ReplicaSet deletes exactly them when `replicas` drops.
Multi-node: the victims are the highest-numbered replicas' StatefulSets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from radixfleet.operator import names
from radixfleet.operator.endpoints import Pod, is_draining, is_ready, serving_pods, worker_url
from radixfleet.operator.kube import KubeApi
from radixfleet.operator.router_client import RouterClient, RouterError
from radixfleet.operator.spec import InferenceServiceSpec

log = logging.getLogger(__name__)


def choose_victims(spec: InferenceServiceSpec, pods: Sequence[Pod], count: int) -> list[Pod]:
    """The `count` engine pods to remove: already draining, then not Ready, then newest."""
    alive = [p for p in serving_pods(spec, pods) if not p["metadata"].get("deletionTimestamp")]

    def order(pod: Pod) -> tuple[int, int, str]:
        return (0 if is_draining(pod) else 1, 0 if not is_ready(pod) else 1, _negated(pod["metadata"].get("creationTimestamp") or ""))

    return sorted(alive, key=order)[:count]


def _negated(timestamp: str) -> str:
    # Newest first within a class: invert the ISO timestamp's characters for sorting.
    return "".join(chr(0x10FFFF - ord(c)) for c in timestamp)


async def remove_from_routers(urls: Iterable[str], routers: Sequence[str], client_for: Callable[[str], RouterClient],
                              why: str) -> list[str]:
    """Remove `urls` from every router that has them; the URLs removed (once per router)."""
    removed = []
    for base in routers:
        client = client_for(base)
        try:
            present = await client.list_workers()
            for url in sorted(set(urls) & present):
                await client.remove_worker(url)
                removed.append(url)
                log.info("router %s: removed worker %s (%s)", base, url, why)
        finally:
            await client.close()
    return removed


async def drain_workers(
    urls: Iterable[str],
    routers: Sequence[str],
    client_for: Callable[[str], RouterClient],
    timeout: float,
    poll: float = 0.5,
) -> bool:
    """Remove `urls` from every router, then wait for their in-flight requests to finish.

    Returns True if they drained, False if the grace timeout ran out first.
    """
    urls = set(urls)
    await remove_from_routers(urls, routers, client_for, "scale-down")
    deadline = time.monotonic() + timeout
    while True:
        busy = 0.0
        for base in routers:
            client = client_for(base)
            try:
                inflight = await client.inflight()
                busy += sum(v for u, v in inflight.items() if u in urls)
            except RouterError as e:
                log.warning("cannot read in-flight requests from %s: %s", base, e)
            finally:
                await client.close()
        if busy <= 0:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)


async def mark_for_deletion(api: KubeApi, spec: InferenceServiceSpec, victims: Iterable[Pod]) -> None:
    """Annotate victim pods so they are never re-registered and are deleted first."""
    for pod in victims:
        patch = {"metadata": {"annotations": {names.ANNOTATION_DRAINING: "true", names.ANNOTATION_DELETION_COST: "-1000"}}}
        await api.patch("Pod", spec.namespace, pod["metadata"]["name"], patch)


def victim_urls(spec: InferenceServiceSpec, victims: Iterable[Pod]) -> list[str]:
    return [worker_url(spec, p) for p in victims if (p.get("status") or {}).get("podIP")]
