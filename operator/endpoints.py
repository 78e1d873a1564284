"""Which pods should be router workers, and where the routers are: pure functions of the
pod list, so that every sync is level-based (the result never depends on missed events).

A worker is a serving engine pod (single-node: every engine pod; multi-node: rank 0 of a
replica that is still wanted) that is Ready, has an IP, is not terminating and is not
marked for draining.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from radixfleet.operator import names
from radixfleet.operator.spec import InferenceServiceSpec

Pod = Mapping[str, Any]


def is_ready(pod: Pod) -> bool:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())


def _labels(pod: Pod) -> Mapping[str, str]:
    return (pod.get("metadata") or {}).get("labels") or {}


def _component(pods: Iterable[Pod], spec: InferenceServiceSpec, component: str) -> list[Pod]:
    return [p for p in pods if _labels(p).get(names.LABEL_SERVICE) == spec.name and _labels(p).get(names.LABEL_COMPONENT) == component]


def is_draining(pod: Pod) -> bool:
    return ((pod.get("metadata") or {}).get("annotations") or {}).get(names.ANNOTATION_DRAINING) == "true"


def serving_pods(spec: InferenceServiceSpec, pods: Iterable[Pod]) -> list[Pod]:
    """Engine pods that serve HTTP for a replica the spec still wants."""
    engine = _component(pods, spec, names.ENGINE)
    if not spec.multi_node:
        return engine
    out = []
    for pod in engine:
        labels = _labels(pod)
        replica = labels.get(names.LABEL_REPLICA, "")
        if labels.get(names.LABEL_POD_INDEX) == "0" and replica.isdigit() and int(replica) < spec.replicas:
            out.append(pod)
    return out


def worker_url(spec: InferenceServiceSpec, pod: Pod) -> str:
    return f"http://{pod['status']['podIP']}:{spec.port}"


def ready_workers(spec: InferenceServiceSpec, pods: Iterable[Pod]) -> dict[str, Pod]:
    """URL -> pod for every endpoint the routers should have, and only those."""
    return {worker_url(spec, p): p for p in serving_pods(spec, pods) if is_ready(p) and not is_draining(p)}


def router_urls(spec: InferenceServiceSpec, pods: Iterable[Pod]) -> list[str]:
    """One base URL per Ready router pod: each keeps its own worker list."""
    return sorted(f"http://{p['status']['podIP']}:{spec.router.port}" for p in _component(pods, spec, names.ROUTER) if is_ready(p))
