"""The InferenceService status: phase, conditions with reasons, replica counts, workers.

A pure function of what the reconciler observed; the handlers write it only when it
changed (lastTransitionTime moves only when a condition's status flips).
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from radixfleet.operator import names
from radixfleet.operator.spec import InferenceServiceSpec


class Phase(str, enum.Enum):
    PENDING = "Pending"  # nothing serving yet
    PROGRESSING = "Progressing"  # some replicas serving, more on the way
    READY = "Ready"  # every desired replica registered on every router
    DEGRADED = "Degraded"  # was or should be serving, but routers or workers are missing
    FAILED = "Failed"  # the spec is invalid; fix it to continue


@dataclass(frozen=True)
class Observed:
    """What one reconcile saw."""

    ready_replicas: int
    workers: Sequence[str]
    routers_ready: int
    router_errors: Sequence[str] = ()
    restarting_groups: Sequence[str] = ()  # multi-node groups not whole since a restart, and why


def _condition(type_: str, ok: bool, reason: str, message: str) -> dict[str, str]:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason, "message": message}


def build_conditions(spec: InferenceServiceSpec, seen: Observed) -> list[dict[str, str]]:
    want = spec.replicas
    if want == 0:
        engine = _condition("EngineReady", True, "ScaledToZero", "spec.replicas is 0")
    elif seen.ready_replicas >= want:
        engine = _condition("EngineReady", True, "AllReplicasReady", f"{seen.ready_replicas}/{want} replicas ready")
    elif seen.ready_replicas:
        engine = _condition("EngineReady", False, "ReplicasStarting", f"{seen.ready_replicas}/{want} replicas ready")
    else:
        engine = _condition("EngineReady", False, "NoReplicaReady", f"0/{want} replicas ready (loading the model?)")
    if seen.router_errors:
        router = _condition("RouterReady", False, "RouterUnreachable", "; ".join(seen.router_errors)[:500])
    elif seen.routers_ready >= spec.router.replicas:
        router = _condition("RouterReady", True, "RouterAvailable", f"{seen.routers_ready} router pod(s) ready")
    else:
        router = _condition("RouterReady", False, "RouterStarting", f"{seen.routers_ready}/{spec.router.replicas} router pods ready")
    registered = len(seen.workers) >= min(want, seen.ready_replicas)
    ok = engine["status"] == "True" and router["status"] == "True" and registered
    ready = _condition("Ready", ok, "Serving" if ok else "NotServing",
                       f"{len(seen.workers)} worker(s) registered at {names.router_url(spec)}")
    if not spec.multi_node:
        return [ready, engine, router]
    if seen.restarting_groups:
        groups = _condition("GroupsWhole", False, "GroupRestarting", "; ".join(seen.restarting_groups)[:500])
    else:
        groups = _condition("GroupsWhole", True, "AllGroupsWhole", "no multi-node group is restarting")
    return [ready, engine, router, groups]


def build_phase(spec: InferenceServiceSpec, seen: Observed, previous: Phase | None) -> Phase:
    router_ok = seen.routers_ready > 0 and not seen.router_errors
    if spec.replicas == 0 or (seen.ready_replicas >= spec.replicas and router_ok):
        return Phase.READY
    if previous in (Phase.READY, Phase.DEGRADED) and (not router_ok or seen.ready_replicas == 0):
        return Phase.DEGRADED
    return Phase.PROGRESSING if seen.ready_replicas else Phase.PENDING


def _stamp(new: list[dict[str, str]], old: Sequence[Mapping[str, Any]], now: str) -> list[dict[str, Any]]:
    old_by_type = {c.get("type"): c for c in old or ()}
    out = []
    for cond in new:
        prev = old_by_type.get(cond["type"])
        same = prev is not None and prev.get("status") == cond["status"]
        out.append({**cond, "lastTransitionTime": prev.get("lastTransitionTime", now) if same else now})
    return out


def build_status(spec: InferenceServiceSpec, seen: Observed, old: Mapping[str, Any] | None, now: datetime.datetime | None = None) -> dict[str, Any]:
    old = old or {}
    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    previous = Phase(old["phase"]) if old.get("phase") in Phase._value2member_map_ else None
    conditions = build_conditions(spec, seen)
    status: dict[str, Any] = {
        "phase": build_phase(spec, seen, previous).value,
        "model": spec.served_name,
        "replicas": spec.replicas,
        "readyReplicas": seen.ready_replicas,
        "selector": names.selector_string(spec),
        "url": names.router_url(spec),
        "workers": sorted(seen.workers),
        "conditions": _stamp(conditions, old.get("conditions") or (), stamp),
    }
    if spec.generation is not None:
        status["observedGeneration"] = spec.generation
    return status


def failed_status(message: str, old: Mapping[str, Any] | None, generation: int | None) -> dict[str, Any]:
    """Status for an invalid spec (PermanentError)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    cond = _condition("Ready", False, "InvalidSpec", message)
    status: dict[str, Any] = {"phase": Phase.FAILED.value, "conditions": _stamp([cond], (old or {}).get("conditions") or (), stamp)}
    if generation is not None:
        status["observedGeneration"] = generation
    return status
