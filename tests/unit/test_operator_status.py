"""Status: phase, conditions with reasons, stable transition times (pure)."""

from __future__ import annotations

import datetime

from radixfleet.operator.spec import parse_spec
from radixfleet.operator.status import Observed, Phase, build_status, failed_status

SPEC = parse_spec({"metadata": {"name": "chat", "namespace": "ml", "generation": 4}, "spec": {"model": {"path": "m"}, "replicas": 2}})
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
T1 = T0 + datetime.timedelta(minutes=5)


def conditions(status):
    return {c["type"]: c for c in status["conditions"]}


def test_pending_then_progressing_then_ready():
    pending = build_status(SPEC, Observed(0, [], 1), None, T0)
    assert pending["phase"] == Phase.PENDING.value
    assert conditions(pending)["EngineReady"]["reason"] == "NoReplicaReady"
    half = build_status(SPEC, Observed(1, ["http://a"], 1), pending, T0)
    assert half["phase"] == Phase.PROGRESSING.value and conditions(half)["EngineReady"]["message"] == "1/2 replicas ready"
    ready = build_status(SPEC, Observed(2, ["http://a", "http://b"], 1), half, T1)
    assert ready["phase"] == Phase.READY.value and conditions(ready)["Ready"]["status"] == "True"
    assert ready["readyReplicas"] == 2 and ready["workers"] == ["http://a", "http://b"]
    assert ready["observedGeneration"] == 4 and ready["selector"] == "app.kubernetes.io/component=engine,radixfleet.io/service=chat"
    assert ready["url"] == "http://chat-router.ml.svc.cluster.local:30000"


def test_losing_the_router_after_serving_is_degraded():
    ready = build_status(SPEC, Observed(2, ["a", "b"], 1), None, T0)
    broken = build_status(SPEC, Observed(2, [], 0, ("router down",)), ready, T1)
    assert broken["phase"] == Phase.DEGRADED.value
    assert conditions(broken)["RouterReady"]["reason"] == "RouterUnreachable"


def test_transition_time_moves_only_when_the_status_flips():
    first = build_status(SPEC, Observed(2, ["a", "b"], 1), None, T0)
    again = build_status(SPEC, Observed(2, ["a", "b"], 1), first, T1)
    assert again == first  # nothing changed: nothing to write
    flipped = build_status(SPEC, Observed(1, ["a"], 1), again, T1)
    assert conditions(flipped)["EngineReady"]["lastTransitionTime"] == "2026-01-01T00:05:00Z"
    assert conditions(flipped)["RouterReady"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"


def test_invalid_spec_status():
    status = failed_status("spec.replicas must be ...", None, 3)
    assert status["phase"] == "Failed" and status["observedGeneration"] == 3
    assert status["conditions"][0]["reason"] == "InvalidSpec"
