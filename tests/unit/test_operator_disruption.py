"""spec.disruption (parser and CRD schema) and the pure multi-node group rules: when a group
has a fault, and how a new template rolls one group at a time."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from radixfleet.operator import names
from radixfleet.operator.groups import fault, groups_of, is_whole, plan_rollout
from radixfleet.operator.manifests.children import build_children
from radixfleet.operator.spec import SpecError, parse_spec

CRD = Path(__file__).resolve().parents[2] / "crds" / "inferenceservice.yaml"
BODY = {
    "apiVersion": "radixfleet.io/v1alpha1", "kind": "InferenceService",
    "metadata": {"name": "big", "namespace": "ml", "uid": "u"},
    "spec": {"model": {"path": "/m"}, "replicas": 2, "tensorParallelSize": 2, "nodesPerReplica": 2},
}


def spec_with(**changes):
    body = copy.deepcopy(BODY)
    body["spec"].update(changes)
    return parse_spec(body)


@pytest.mark.parametrize(("disruption", "schema_says", "parser_says"), [
    ({"drainTimeoutSeconds": -1}, "-1 is less than the minimum of 0", "disruption.drainTimeoutSeconds must be between 0 and 3600"),
    ({"preStopSeconds": 301}, "301 is greater than the maximum of 300", "disruption.preStopSeconds must be between 0 and 300"),
    ({"maxUnavailable": "1"}, "'1' is not of type 'integer'", "disruption.maxUnavailable must be an integer"),
])
def test_bad_disruption_settings_are_rejected(disruption, schema_says, parser_says):
    body = copy.deepcopy(BODY)
    body["spec"]["disruption"] = disruption
    with pytest.raises(jsonschema.ValidationError, match=schema_says):
        jsonschema.Draft4Validator(yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]).validate(body)
    with pytest.raises(SpecError, match=parser_says):
        parse_spec(body)


def test_grace_period_covers_pre_stop_and_drain():
    d = spec_with(disruption={"drainTimeoutSeconds": 300, "preStopSeconds": 10}).disruption
    assert d.termination_grace_seconds >= 310


def pod(group: str, rank: int, ip: str, *, uid: str | None = None, ready: bool = True, restarts: int = 0,
        terminating: bool = False) -> dict:
    meta = {"name": f"{group}-{rank}", "uid": uid or f"{group}-{rank}",
            "labels": {names.LABEL_SERVICE: "big", names.LABEL_COMPONENT: names.ENGINE, names.LABEL_GROUP: group,
                       names.LABEL_REPLICA: group.split("-")[-1].rstrip("b"), names.LABEL_POD_INDEX: str(rank)}}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"podIP": ip, "phase": "Running",
                                         "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                                         "containerStatuses": [{"name": "engine", "restartCount": restarts}]}}


def statefulsets(spec, *groups: tuple[int, str], members: dict[str, str] | None = None, stale: set[str] = frozenset()):
    out = []
    for m in build_children(spec, groups=list(groups)):
        if m["kind"] == "StatefulSet":
            notes = m["metadata"]["annotations"]
            if m["metadata"]["name"] in stale:
                notes[names.ANNOTATION_TEMPLATE_HASH] = "old"
            if members and m["metadata"]["name"] in members:
                notes[names.ANNOTATION_MEMBERS] = members[m["metadata"]["name"]]
            out.append(m)
    return out


def test_a_group_is_whole_only_with_every_rank_ready_and_no_restart():
    spec = spec_with()
    (g,) = groups_of(spec, statefulsets(spec, (0, "big-engine-0")), [pod("big-engine-0", 0, "10.0.0.1"), pod("big-engine-0", 1, "10.0.0.2")])
    assert is_whole(spec, g) and fault(g) is None
    (g,) = groups_of(spec, statefulsets(spec, (0, "big-engine-0")), [pod("big-engine-0", 0, "10.0.0.1")])
    assert not is_whole(spec, g) and fault(g) is None  # still forming, never whole: nothing to restart


@pytest.mark.parametrize(("pods", "reason"), [
    ([pod("big-engine-0", 0, "10.0.0.1")], "rank 1 (pod big-engine-0-1) was deleted"),
    ([pod("big-engine-0", 0, "10.0.0.1"), pod("big-engine-0", 1, "10.0.0.2", terminating=True)], "rank 1 (pod big-engine-0-1) is terminating"),
    ([pod("big-engine-0", 0, "10.0.0.1"), pod("big-engine-0", 1, "10.0.0.2", uid="new")], "rank 1 (pod big-engine-0-1) was deleted"),
    ([pod("big-engine-0", 0, "10.0.0.1", restarts=2), pod("big-engine-0", 1, "10.0.0.2")], "rank 0 (pod big-engine-0-0) restarted its container 2 time(s)"),
], ids=["deleted", "terminating", "replaced", "restarted"])
def test_a_recorded_group_that_lost_a_rank_has_a_fault(pods, reason):
    spec = spec_with()
    (g,) = groups_of(spec, statefulsets(spec, (0, "big-engine-0"), members={"big-engine-0": "big-engine-0-0,big-engine-0-1"}), pods)
    assert fault(g) == reason


def test_a_new_template_replaces_one_group_at_a_time_and_retires_the_old_once_the_new_serves():
    spec = spec_with()
    old = statefulsets(spec, (0, "big-engine-0"), (1, "big-engine-1"), stale={"big-engine-0", "big-engine-1"})
    pods = [pod(f"big-engine-{r}", k, f"10.0.{r}.{k}") for r in (0, 1) for k in (0, 1)]
    serving = {"http://10.0.0.0:30000", "http://10.0.1.0:30000"}
    plan = plan_rollout(spec, groups_of(spec, old, pods), serving)
    assert plan.build == [(0, "big-engine-0b")] and plan.keep == {"big-engine-0", "big-engine-1"} and not plan.retire
    # The new group is starting: nothing retires, replica 1 waits.
    new = statefulsets(spec, (0, "big-engine-0b"))
    plan = plan_rollout(spec, groups_of(spec, old + new, pods + [pod("big-engine-0b", 0, "10.0.2.0", ready=False)]), serving)
    assert plan.build == [(0, "big-engine-0b")] and plan.keep == {"big-engine-0", "big-engine-1"} and not plan.retire
    # Whole and registered: the old group retires; replica 1 still waits for the next round.
    ready = [pod("big-engine-0b", 0, "10.0.2.0"), pod("big-engine-0b", 1, "10.0.2.1")]
    plan = plan_rollout(spec, groups_of(spec, old + new, pods + ready), serving | {"http://10.0.2.0:30000"})
    assert [g.name for g in plan.retire] == ["big-engine-0"] and plan.keep == {"big-engine-1"}
    assert plan.build == [(0, "big-engine-0b")]
    # Next round: replica 1's replacement takes the other name of its pair.
    plan = plan_rollout(spec, groups_of(spec, old[1:] + new, pods[2:] + ready), serving)
    assert plan.build == [(0, "big-engine-0b"), (1, "big-engine-1b")]
    assert plan_rollout(spec, groups_of(spec, statefulsets(spec, (0, "big-engine-0b")), ready), set()).build == [
        (0, "big-engine-0b"), (1, "big-engine-1")]


def test_the_alternate_group_name_fits_a_statefulset_name():
    longest = parse_spec({**BODY, "metadata": {"name": "a" * 40}, "spec": {**BODY["spec"], "replicas": 1000}})
    assert len(names.group_name(longest, 999, alternate=True)) <= 52  # its pods' revision label stays <= 63
