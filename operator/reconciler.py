"""One reconcile of one InferenceService: drain, apply, prune, register, report.

Every step is level-based: it compares the desired state (from the spec) with what the
API and the routers say now, so running it twice, after an operator restart, or after a
missed event, converges to the same place with no extra writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from radixfleet.operator import names
from radixfleet.operator.apply import Outcome, apply, is_subset
from radixfleet.operator.drain import (
    choose_victims,
    drain_workers,
    mark_for_deletion,
    remove_from_routers,
    victim_urls,
)
from radixfleet.operator.endpoints import (
    Pod,
    is_draining,
    ready_workers,
    router_urls,
    serving_pods,
    worker_url,
)
from radixfleet.operator.groups import RolloutPlan, fault, groups_of, is_whole, plan_rollout
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


async def roll_groups(rt: Runtime, spec: InferenceServiceSpec, pods: list[Pod], emit: Emit) -> RolloutPlan:
    """Multi-node rollout, one replica at a time: start the new group, and once it serves,
    drain the old one out of the routers (prune then deletes it)."""
    groups = groups_of(spec, await rt.kube.list("StatefulSet", spec.namespace, {names.LABEL_SERVICE: spec.name}), pods)
    memory = rt.router_memory(spec)
    serving = set.intersection(*memory.values()) if memory else set()
    plan = plan_rollout(spec, groups, serving)
    for message in plan.started:
        emit("Normal", "GroupRollout", message)
    for old in plan.retire:
        urls = [u for u in [old.rank0_url(spec)] if u]
        drained = await drain_workers(urls, router_urls(spec, pods), await rt.router_clients(spec),
                                      rt.config.drain_timeout_seconds, rt.config.drain_poll_seconds)
        emit("Normal", "GroupReplaced", f"replica {old.replica}: the new group serves; {old.name} removed from the router, "
             f"{'drained' if drained else 'drain timed out'}, deleted")
    return plan


async def heal_groups(rt: Runtime, spec: InferenceServiceSpec, pods: list[Pod], emit: Emit) -> tuple[set[str], list[str]]:
    """Restart every multi-node group with a fault: rank 0 out of the routers first, then all
    its pods deleted, so that the StatefulSet starts every rank again together. Returns the
    rank-0 URLs that must not be registered, and a line per group not whole since a restart."""
    excluded: set[str] = set()
    restarting: list[str] = []
    statefulsets = await rt.kube.list("StatefulSet", spec.namespace, {names.LABEL_SERVICE: spec.name})
    for group in groups_of(spec, statefulsets, pods):
        notes = group.annotations
        reason = fault(group)
        if reason is None:
            if is_whole(spec, group):
                await _record_whole(rt, spec, group.name, notes, [p["metadata"]["uid"] for p in group.live], emit)
            elif notes.get(names.ANNOTATION_RESTART_REASON):
                restarting.append(f"{group.name} restarting: {notes[names.ANNOTATION_RESTART_REASON]}")
            continue
        url = group.rank0_url(spec)
        excluded |= {url} if url else set()
        restarting.append(f"{group.name} restarting: {reason}")
        if time.time() - float(notes.get(names.ANNOTATION_RESTARTED_AT) or 0) < rt.config.group_restart_backoff_seconds:
            continue  # restarted a moment ago: give the new ranks time (kept out of the routers meanwhile)
        if url:
            await remove_from_routers([url], router_urls(spec, pods), await rt.router_clients(spec), "group restart")
        for pod in group.live:
            await rt.kube.delete("Pod", spec.namespace, pod["metadata"]["name"])
        await _annotate(rt, spec, group.name, {names.ANNOTATION_MEMBERS: None, names.ANNOTATION_RESTART_REASON: reason,
                                               names.ANNOTATION_RESTARTED_AT: f"{time.time():.0f}"})
        emit("Warning", "GroupRestart", f"group {group.name}: {reason}; rank 0 removed from the router and all "
             f"{len(group.live)} live pod(s) deleted, so that every rank starts again together")
    return excluded, restarting


async def _record_whole(rt: Runtime, spec: InferenceServiceSpec, group: str, notes: Mapping[str, str],
                        uids: Iterable[str], emit: Emit) -> None:
    changes: dict[str, str | None] = {}
    if notes.get(names.ANNOTATION_MEMBERS) != ",".join(uids):
        changes[names.ANNOTATION_MEMBERS] = ",".join(uids)
    if notes.get(names.ANNOTATION_RESTART_REASON):
        changes[names.ANNOTATION_RESTART_REASON] = None
        emit("Normal", "GroupRecovered", f"group {group}: every rank is Ready again")
    if changes:
        await _annotate(rt, spec, group, changes)


async def _annotate(rt: Runtime, spec: InferenceServiceSpec, statefulset: str, annotations: dict[str, str | None]) -> None:
    await rt.kube.patch("StatefulSet", spec.namespace, statefulset, {"metadata": {"annotations": annotations}})


async def apply_children(rt: Runtime, spec: InferenceServiceSpec, emit: Emit, plan: RolloutPlan | None = None) -> list[dict[str, Any]]:
    desired = build_children(spec, groups=plan.build if plan else None)
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


async def prune(rt: Runtime, spec: InferenceServiceSpec, desired: list[dict[str, Any]], emit: Emit,
                keep: Iterable[str] = ()) -> None:
    """Delete children this service owns that the spec no longer wants (`keep`: groups
    that a rollout still needs as they are)."""
    wanted = {(m["kind"], m["metadata"]["name"]) for m in desired}
    wanted |= {(kind, name) for name in keep for kind in ("StatefulSet", "Service")}
    for kind in PRUNABLE_KINDS:
        for obj in await rt.kube.list(kind, spec.namespace, {names.LABEL_SERVICE: spec.name}):
            meta = obj["metadata"]
            owned = any(ref.get("uid") == spec.uid for ref in meta.get("ownerReferences") or ())
            if owned and (kind, meta["name"]) not in wanted:
                await rt.kube.delete(kind, spec.namespace, meta["name"])
                emit("Normal", "Deleted", f"{kind} {meta['name']} deleted")


async def sync_workers(rt: Runtime, spec: InferenceServiceSpec, pods: list[Pod], emit: Emit) -> Observed:
    """Make every Ready router's worker list equal to the Ready serving endpoints (restarting
    multi-node groups first, and leaving their rank 0 out)."""
    excluded, restarting = await heal_groups(rt, spec, pods, emit) if spec.multi_node else (set(), [])
    desired = {url: pod for url, pod in ready_workers(spec, pods).items() if url not in excluded}
    routers = router_urls(spec, pods)
    result = await sync_routers(routers, set(desired), rt.router_memory(spec), await rt.router_clients(spec),
                                spec.router.kv_events_port)
    for base in result.restarted:
        emit("Warning", "RouterRestarted", f"router {base} lost its workers (restart?); re-registering {len(desired)}")
    for url in sorted(result.added):
        emit("Normal", "WorkerRegistered", f"worker {url} added to the router")
    for url in sorted(result.removed):
        emit("Normal", "WorkerRemoved", f"worker {url} removed from the router")
    for error in result.errors:
        emit("Warning", "RouterUnreachable", error)
    return Observed(ready_replicas=len(desired), workers=sorted(result.registered), routers_ready=result.routers_ok,
                    router_errors=tuple(result.errors), restarting_groups=tuple(restarting))


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
        plan = await roll_groups(rt, spec, pods, emit) if spec.multi_node else None
        desired = await apply_children(rt, spec, emit, plan)
        await prune(rt, spec, desired, emit, plan.keep if plan else ())
        seen = await sync_workers(rt, spec, await list_pods(rt, spec), emit)
        await write_status(rt, spec, seen)
        return seen


async def deregister_terminating(rt: Runtime, spec: InferenceServiceSpec, pod: Pod, emit: Emit) -> None:
    """A serving pod being deleted leaves every router now, while its preStop sleep keeps it
    serving. Without the lock: this must not wait behind a reconcile's drain."""
    if not serving_pods(spec, [pod]) or not (pod.get("status") or {}).get("podIP"):
        return
    url = worker_url(spec, pod)
    routers = router_urls(spec, await list_pods(rt, spec))
    if await remove_from_routers([url], routers, await rt.router_clients(spec), "pod terminating"):
        emit("Normal", "WorkerRemoved", f"worker {url} removed from the router: pod {pod['metadata']['name']} is terminating")


async def resync_workers(rt: Runtime, spec: InferenceServiceSpec, emit: Emit) -> Observed:
    """The fast path on pod events: only the router lists and the status."""
    async with rt.lock(spec):
        seen = await sync_workers(rt, spec, await list_pods(rt, spec), emit)
        await write_status(rt, spec, seen)
        return seen
