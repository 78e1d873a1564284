"""Multi-node groups: a replica is a StatefulSet of ranks (one pod per node) that serves only
while every rank is there. Pure functions of the live StatefulSets and pods, so that every
decision is level-based.

A group is *whole* when all `nodesPerReplica` ranks run, are Ready and not terminating, and no
container restarted; the operator then records their pod uids on the StatefulSet
(`ANNOTATION_MEMBERS`). A group has a *fault* when one of its live pods restarted a container
or failed, or a recorded member is gone or terminating: the ranks left wait at a collective
(or at rendezvous) that can never complete, so the whole group must start again.

Rollout: a new pod template never restarts ranks in place (`updateStrategy: OnDelete`).
Per replica the operator creates the other group of the pair (`names.group_name`), and only
once its rank 0 is registered on every router does it retire (drain, then delete) the old
one; one replica at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from radixfleet.operator import names
from radixfleet.operator.endpoints import Pod, is_ready, worker_url
from radixfleet.operator.manifests.engine import template_hash
from radixfleet.operator.spec import InferenceServiceSpec


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _terminating(pod: Pod) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def rank(pod: Pod) -> int:
    index = _labels(pod).get(names.LABEL_POD_INDEX, "")
    return int(index) if index.isdigit() else -1


def restarts(pod: Pod) -> int:
    return sum(int(c.get("restartCount") or 0) for c in (pod.get("status") or {}).get("containerStatuses") or ())


@dataclass(frozen=True)
class Group:
    """One live group: its StatefulSet and its pods (terminating ones included), by rank."""

    name: str
    replica: int
    statefulset: Mapping[str, Any]
    pods: tuple[Pod, ...] = ()

    @property
    def annotations(self) -> Mapping[str, str]:
        return (self.statefulset.get("metadata") or {}).get("annotations") or {}

    @property
    def members(self) -> list[str]:
        raw = self.annotations.get(names.ANNOTATION_MEMBERS) or ""
        return raw.split(",") if raw else []

    @property
    def live(self) -> list[Pod]:
        return [p for p in self.pods if not _terminating(p)]

    @property
    def rank0(self) -> Pod | None:
        return next((p for p in self.live if rank(p) == 0), None)

    def rank0_url(self, spec: InferenceServiceSpec) -> str | None:
        pod = self.rank0
        return worker_url(spec, pod) if pod is not None and (pod.get("status") or {}).get("podIP") else None


def pod_group(spec: InferenceServiceSpec, pod: Pod) -> str | None:
    labels = _labels(pod)
    if names.LABEL_GROUP in labels:
        return labels[names.LABEL_GROUP]
    replica = labels.get(names.LABEL_REPLICA, "")
    return names.group_name(spec, int(replica)) if replica.isdigit() else None  # a pod from before group labels


def groups_of(spec: InferenceServiceSpec, statefulsets: Iterable[Mapping[str, Any]], pods: Iterable[Pod]) -> list[Group]:
    by_group: dict[str, list[Pod]] = {}
    for pod in pods:
        if _labels(pod).get(names.LABEL_COMPONENT) == names.ENGINE and (g := pod_group(spec, pod)):
            by_group.setdefault(g, []).append(pod)
    out = []
    for sts in statefulsets:
        name, replica = sts["metadata"]["name"], _labels(sts).get(names.LABEL_REPLICA, "")
        if replica.isdigit():
            out.append(Group(name, int(replica), sts, tuple(sorted(by_group.get(name, ()), key=rank))))
    return sorted(out, key=lambda g: (g.replica, g.name))


def is_whole(spec: InferenceServiceSpec, group: Group) -> bool:
    live = group.live
    return (sorted(rank(p) for p in live) == list(range(spec.nodes_per_replica))
            and all(is_ready(p) and not restarts(p) for p in live))


def fault(group: Group) -> str | None:
    """Why `group` can no longer serve and must restart as a whole, or None."""
    for pod in group.live:
        who = f"rank {rank(pod)} (pod {pod['metadata']['name']})"
        if n := restarts(pod):
            return f"{who} restarted its container {n} time(s)"
        if (pod.get("status") or {}).get("phase") == "Failed":
            return f"{who} failed"
    live_uids = {p["metadata"].get("uid") for p in group.live}
    for i, uid in enumerate(group.members):
        if uid not in live_uids:
            terminating = any(p["metadata"].get("uid") == uid for p in group.pods)
            return f"rank {i} (pod {group.name}-{i}) {'is terminating' if terminating else 'was deleted'}"
    return None


@dataclass
class RolloutPlan:
    """What the reconciler does with the groups this round."""

    build: list[tuple[int, str]] = field(default_factory=list)  # (replica, group) applied from the spec
    keep: set[str] = field(default_factory=set)  # stale groups left as they are (their replacement starts)
    retire: list[Group] = field(default_factory=list)  # stale groups whose replacement serves: drain, delete
    started: list[str] = field(default_factory=list)  # messages: replacements begun


def plan_rollout(spec: InferenceServiceSpec, groups: Sequence[Group], serving: set[str]) -> RolloutPlan:
    """`serving`: the worker URLs registered on every router. Groups of replicas the spec no
    longer wants are left out (scale-down drains them and prune deletes them)."""
    plan = RolloutPlan()
    want = {r: template_hash(spec, r) for r in range(spec.replicas)}
    by_replica: dict[int, list[Group]] = {r: [] for r in range(spec.replicas)}
    for g in groups:
        if g.replica in by_replica:
            by_replica[g.replica].append(g)
    fresh = {r: [g for g in gs if g.annotations.get(names.ANNOTATION_TEMPLATE_HASH) == want[r]] for r, gs in by_replica.items()}
    stale = {r: [g for g in gs if g not in fresh[r]] for r, gs in by_replica.items()}
    busy = any(fresh[r] and stale[r] for r in by_replica)  # one replica rolls at a time
    for r in by_replica:
        if fresh[r]:
            plan.build += [(r, g.name) for g in fresh[r]]
            new = fresh[r][0]
            if not stale[r]:
                continue
            if is_whole(spec, new) and new.rank0_url(spec) in serving:
                plan.retire += stale[r]
            else:
                plan.keep |= {g.name for g in stale[r]}
        elif not stale[r]:
            plan.build.append((r, names.group_name(spec, r)))
        else:
            # Keep the one that serves; a second stale group (the spec changed again mid-rollout) goes.
            old = next((g for g in stale[r] if g.rank0_url(spec) in serving), stale[r][0])
            plan.keep.add(old.name)
            if not busy:
                busy = True
                group = names.group_name(spec, r, alternate=old.name == names.group_name(spec, r))
                plan.build.append((r, group))
                plan.started.append(f"replica {r}: new group {group} starts with the new pod template; "
                                    f"{old.name} serves until {group} is Ready and registered")
    return plan
