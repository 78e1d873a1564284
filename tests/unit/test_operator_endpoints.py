"""Which pods are router workers, and which go first on scale-down (pure functions)."""

from __future__ import annotations

from kube_harness import pod_manifest

from radixfleet.operator import names
from radixfleet.operator.drain import choose_victims
from radixfleet.operator.endpoints import ready_workers, router_urls
from radixfleet.operator.registration import plan
from radixfleet.operator.spec import parse_spec

SINGLE = parse_spec({"metadata": {"name": "chat", "namespace": "ml"}, "spec": {"model": {"path": "m"}, "replicas": 3}})
MULTI = parse_spec({"metadata": {"name": "big", "namespace": "ml"},
                    "spec": {"model": {"path": "m"}, "replicas": 1, "tensorParallelSize": 4, "nodesPerReplica": 2}})


def engine(spec, name, ip, ready=True, created="2026-01-01T00:00:00Z", **labels):
    base = {names.LABEL_SERVICE: spec.name, names.LABEL_COMPONENT: names.ENGINE, **labels}
    return pod_manifest(name, "ml", base, ip, ready=ready, created=created)


def test_only_ready_live_undrained_pods_are_workers():
    terminating = engine(SINGLE, "c", "10.0.0.3")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    draining = engine(SINGLE, "d", "10.0.0.4")
    draining["metadata"]["annotations"] = {names.ANNOTATION_DRAINING: "true"}
    no_ip = engine(SINGLE, "e", "")
    other_service = engine(MULTI, "f", "10.0.0.6")
    pods = [engine(SINGLE, "a", "10.0.0.1"), engine(SINGLE, "b", "10.0.0.2", ready=False), terminating, draining, no_ip, other_service]
    assert set(ready_workers(SINGLE, pods)) == {"http://10.0.0.1:30000"}


def test_multi_node_workers_are_rank_zero_of_wanted_replicas():
    pods = [
        engine(MULTI, "big-engine-0-0", "10.0.1.1", **{names.LABEL_REPLICA: "0", names.LABEL_POD_INDEX: "0"}),
        engine(MULTI, "big-engine-0-1", "10.0.1.2", **{names.LABEL_REPLICA: "0", names.LABEL_POD_INDEX: "1"}),
        engine(MULTI, "big-engine-1-0", "10.0.1.3", **{names.LABEL_REPLICA: "1", names.LABEL_POD_INDEX: "0"}),  # replicas=1
    ]
    assert set(ready_workers(MULTI, pods)) == {"http://10.0.1.1:30000"}


def test_router_urls_are_ready_router_pods():
    labels = {names.LABEL_SERVICE: "chat", names.LABEL_COMPONENT: names.ROUTER}
    pods = [pod_manifest("r1", "ml", labels, "10.0.2.1", ready=True), pod_manifest("r2", "ml", labels, "10.0.2.2", ready=False)]
    assert router_urls(SINGLE, pods) == ["http://10.0.2.1:30000"]


def test_scale_down_victims_prefer_draining_then_unready_then_newest():
    old = engine(SINGLE, "old", "10.0.0.1", created="2026-01-01T00:00:00Z")
    new = engine(SINGLE, "new", "10.0.0.2", created="2026-01-02T00:00:00Z")
    unready = engine(SINGLE, "unready", "10.0.0.3", ready=False, created="2025-12-01T00:00:00Z")
    draining = engine(SINGLE, "draining", "10.0.0.4", created="2025-01-01T00:00:00Z")
    draining["metadata"]["annotations"] = {names.ANNOTATION_DRAINING: "true"}
    pods = [old, new, unready, draining]
    assert [p["metadata"]["name"] for p in choose_victims(SINGLE, pods, 4)] == ["draining", "unready", "new", "old"]
    assert [p["metadata"]["name"] for p in choose_victims(SINGLE, [old, new], 1)] == ["new"]


def test_registration_plan_is_a_set_difference():
    p = plan(desired={"a", "b"}, actual={"b", "c"})
    assert p.add == ("a",) and p.remove == ("c",)
    assert plan({"a"}, {"a"}).add == () == plan({"a"}, {"a"}).remove
