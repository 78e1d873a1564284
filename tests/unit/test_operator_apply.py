"""Idempotent apply's drift rule: server-added fields never count as drift."""

from __future__ import annotations

import copy

from radixfleet.operator.apply import is_subset
from radixfleet.operator.manifests.children import build_children
from radixfleet.operator.spec import parse_spec

SPEC = parse_spec({"metadata": {"name": "chat", "namespace": "ml", "uid": "u"}, "spec": {"model": {"path": "m"}}})


def test_server_defaults_are_not_drift():
    desired = build_children(SPEC)[1]  # the engine Deployment
    live = copy.deepcopy(desired)
    live["metadata"].update(resourceVersion="7", uid="x", generation=2, managedFields=[{}])
    container = live["spec"]["template"]["spec"]["containers"][0]
    container.update(terminationMessagePath="/dev/termination-log", terminationMessagePolicy="File")
    live["spec"].update(revisionHistoryLimit=10, progressDeadlineSeconds=600)
    live["status"] = {"replicas": 1}
    assert is_subset(desired, live)


def test_spec_changes_are_drift():
    desired = build_children(SPEC)[1]
    live = copy.deepcopy(desired)
    live["spec"]["replicas"] = 5
    assert not is_subset(desired, live)
    live = copy.deepcopy(desired)
    live["spec"]["template"]["spec"]["containers"][0]["args"].append("--extra")
    assert not is_subset(desired, live)  # lists compare whole: an extra flag is drift


def test_numbers_may_come_back_as_strings():
    assert is_subset({"limits": {"nvidia.com/gpu": 8}}, {"limits": {"nvidia.com/gpu": "8"}})
