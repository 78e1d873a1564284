"""`build_children`: the complete desired state of one InferenceService, as manifests.

Pure: the same spec always gives the same list, in a stable order (Services before the
workloads that resolve them), each with an owner reference to the InferenceService so
that deleting it garbage-collects everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from radixfleet.operator import names
from radixfleet.operator.manifests.disruption import build_pod_disruption_budgets
from radixfleet.operator.manifests.engine import (
    build_engine_deployment,
    build_engine_service,
    build_replica_headless_service,
    build_replica_statefulset,
)
from radixfleet.operator.manifests.monitoring import build_service_monitor
from radixfleet.operator.manifests.router import (
    build_router_deployment,
    build_router_peers_service,
    build_router_service,
)
from radixfleet.operator.spec import InferenceServiceSpec


def owner_reference(spec: InferenceServiceSpec) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "name": spec.name,
        "uid": spec.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _owned(manifest: dict[str, Any], spec: InferenceServiceSpec) -> dict[str, Any]:
    manifest["metadata"]["ownerReferences"] = [owner_reference(spec)]
    return manifest


def build_engine_workloads(spec: InferenceServiceSpec, groups: Sequence[tuple[int, str]] | None = None) -> list[dict[str, Any]]:
    """The engine's Deployment, or a headless Service and a StatefulSet per multi-node group:
    `groups` lists (replica, group name), by default one group per replica."""
    if not spec.multi_node:
        return [build_engine_deployment(spec)]
    out: list[dict[str, Any]] = []
    for r, group in groups if groups is not None else [(r, names.group_name(spec, r)) for r in range(spec.replicas)]:
        out += [build_replica_headless_service(spec, r, group), build_replica_statefulset(spec, r, group)]
    return out


def build_children(spec: InferenceServiceSpec, *, with_service_monitor: bool | None = None,
                   groups: Sequence[tuple[int, str]] | None = None) -> list[dict[str, Any]]:
    """Every child object of `spec`; `with_service_monitor` overrides spec.monitoring; `groups`
    are the multi-node groups to build (a rollout has two for one replica: operator/groups.py)."""
    monitor = spec.monitoring.service_monitor if with_service_monitor is None else with_service_monitor
    children = [
        build_engine_service(spec),
        *build_engine_workloads(spec, groups),
        build_router_service(spec),
        *filter(None, [build_router_peers_service(spec)]),
        build_router_deployment(spec),
        *build_pod_disruption_budgets(spec),
    ]
    if monitor:
        children.append(build_service_monitor(spec))
    return [_owned(m, spec) for m in children]
