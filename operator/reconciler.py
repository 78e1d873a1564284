"""One reconcile of one InferenceService: drain, apply, prune, register, report.

Every step is level-based: it compares the desired state (from the spec) with what the
API and the routers say now, so running it twice, after an operator restart, or after a
missed event, converges to the same place with no extra writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from radixfleet.operator import names
from radixfleet.operator.apply import Outcome, apply, is_subset
from radixfleet.operator.drain import choose_victims, drain_workers, mark_for_deletion, victim_urls
from radixfleet.operator.endpoints import Pod, is_draining, ready_workers, router_urls, worker_url
from radixfleet.operator.kube import KubeError
from radixfleet.operator.manifests.children import build_children
from radixfleet.operator.registration import sync_routers
from radixfleet.operator.runtime import Runtime
from radixfleet.operator.spec import InferenceServiceSpec
from radixfleet.operator.status import Observed, build_status

log = logging.getLogger(__name__)

# emit(type, reason, message): a Kubernetes event on the InferenceService.
Emit = Callable[[str, str, str], None]
PRUNABLE_KINDS = ("StatefulSet", "Service", "Deployment", "ServiceMonitor")


async def list_pods(rt: Runtime, spec: InferenceServiceSpec) -> list[Pod]:
    return await rt.kube.list("Pod", spec.namespace, {names.LABEL_SERVICE: spec.name})


async def scale_down(rt: Runtime, spec: InferenceServiceSpec, pods: list[Pod], emit: Emit) -> None:
    """Remove shrinking replicas from the routers and drain them before any deletion."""
    routers = router_urls(spec, pods)
    client_for = await rt.router_clients(spec)
    if spec.multi_node:
        doomed = [s for s in await rt.kube.list("StatefulSet", spec.namespace, {names.LABEL_SERVICE: spec.name})
                  if int(s["metadata"]["labels"].get(names.LABEL_REPLICA, "0")) >= spec.replicas]
        if not doomed:
            return
        replicas = {s["metadata"]["labels"][names.LABEL_REPLICA] for s in doomed}
        urls = [worker_url(spec, p) for p in pods if (p.get("status") or {}).get("podIP")
                and p["metadata"].get("labels", {}).get(names.LABEL_REPLICA) in replicas
                and p["metadata"].get("labels", {}).get(names.LABEL_POD_INDEX) == "0"]
    else:
        live = await rt.kube.get("Deployment", spec.namespace, names.engine_name(spec))
        current = ((live or {}).get("spec") or {}).get("replicas", 0)
        if current <= spec.replicas:
            await delete_leftover_draining(rt, spec, pods)
            return
        victims = choose_victims(spec, pods, current - spec.replicas)
        await mark_for_deletion(rt.kube, spec, victims)
        urls = victim_urls(spec, victims)
    drained = await drain_workers(urls, routers, client_for, rt.config.drain_timeout_seconds, rt.config.drain_poll_seconds)
    emit("Normal" if drained else "Warning", "ScaleDown",
         f"removed {len(urls)} worker(s) from the router{' and drained them' if drained else '; drain timed out'}: {', '.join(urls)}")


async def delete_leftover_draining(rt: Runtime, spec: InferenceServiceSpec, pods: list[Pod]) -> None:
    """A drained pod the ReplicaSet did not remove (e.g. scaled back up meanwhile): delete it;
    the Deployment replaces it with a fresh pod that registers normally."""
    for pod in pods:
        if is_draining(pod) and not pod["metadata"].get("deletionTimestamp"):
            await rt.kube.delete("Pod", spec.namespace, pod["metadata"]["name"])


async def apply_children(rt: Runtime, spec: InferenceServiceSpec, emit: Emit) -> list[dict[str, Any]]:
    desired = build_children(spec)
    for manifest in desired:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        try:
            outcome = await apply(rt.kube, manifest)
        except KubeError as e:
            if kind == "ServiceMonitor" and e.status == 404:
                emit("Warning", "NoServiceMonitorCRD", "monitoring.serviceMonitor is set but the ServiceMonitor CRD is not installed")
                continue
            raise
        if outcome is not Outcome.UNCHANGED:
            emit("Normal", outcome.value.capitalize(), f"{kind} {name} {outcome.value}")
    return desired


async def prune(rt: Runtime, spec: InferenceServiceSpec, desired: list[dict[str, Any]], emit: Emit) -> None:
    """Delete children this service owns that the spec no longer wants."""
    wanted = {(m["kind"], m["metadata"]["name"]) for m in desired}
    for kind in PRUNABLE_KINDS:
        for obj in await rt.kube.list(kind, spec.namespace, {names.LABEL_SERVICE: spec.name}):
            meta = obj["metadata"]
            owned = any(ref.get("uid") == spec.uid for ref in meta.get("ownerReferences") or ())
            if owned and (kind, meta["name"]) not in wanted:
                await rt.kube.delete(kind, spec.namespace, meta["name"])
                emit("Normal", "Deleted", f"{kind} {meta['name']} deleted")


async def sync_workers(rt: Runtime, spec: InferenceServiceSpec, pods: list[Pod], emit: Emit) -> Observed:
    """Make every Ready router's worker list equal to the Ready serving endpoints."""
    desired = ready_workers(spec, pods)
    routers = router_urls(spec, pods)
    result = await sync_routers(routers, set(desired), rt.router_memory(spec), await rt.router_clients(spec))
    for base in result.restarted:
        emit("Warning", "RouterRestarted", f"router {base} lost its workers (restart?); re-registering {len(desired)}")
    for url in sorted(result.added):
        emit("Normal", "WorkerRegistered", f"worker {url} added to the router")
    for url in sorted(result.removed):
        emit("Normal", "WorkerRemoved", f"worker {url} removed from the router")
    for error in result.errors:
        emit("Warning", "RouterUnreachable", error)
    return Observed(ready_replicas=len(desired), workers=sorted(result.registered), routers_ready=result.routers_ok,
                    router_errors=tuple(result.errors))


async def current_status(rt: Runtime, spec: InferenceServiceSpec) -> dict[str, Any]:
    live = await rt.kube.get("InferenceService", spec.namespace, spec.name)
    return dict((live or {}).get("status") or {})


async def write_status(rt: Runtime, spec: InferenceServiceSpec, seen: Observed) -> bool:
    """Patch the status subresource only if something changed; True if written."""
    old = await current_status(rt, spec)
    status = build_status(spec, seen, old)
    if is_subset(status, old):
        return False
    await rt.kube.patch("InferenceService", spec.namespace, spec.name, {"status": dict(status)}, subresource="status")
    return True


async def reconcile(rt: Runtime, spec: InferenceServiceSpec, emit: Emit) -> Observed:
    """The full loop for one InferenceService; the caller holds no lock."""
    async with rt.lock(spec):
        pods = await list_pods(rt, spec)
        await scale_down(rt, spec, pods, emit)
        desired = await apply_children(rt, spec, emit)
        await prune(rt, spec, desired, emit)
        seen = await sync_workers(rt, spec, await list_pods(rt, spec), emit)
        await write_status(rt, spec, seen)
        return seen


async def resync_workers(rt: Runtime, spec: InferenceServiceSpec, emit: Emit) -> Observed:
    """The fast path on pod events: only the router lists and the status."""
    async with rt.lock(spec):
        seen = await sync_workers(rt, spec, await list_pods(rt, spec), emit)
        await write_status(rt, spec, seen)
        return seen
