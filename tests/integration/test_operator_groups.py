"""Multi-node groups on KMock, with the real operator and a real router: a group whose rank
dies or is deleted is taken out of the router first, then restarted whole, and registered
again once rank 0 is Ready; a new pod template rolls one group at a time, the new group
registered before the old one is drained and deleted.

No engines: the test plays the StatefulSet controller (pods from each StatefulSet's template,
with the pod-index label) and the kubelet (Ready, restart counts); rank-0 pod IPs are
loopback addresses where fake workers answer the router's health checks.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kube_harness import (
    ISVC_PATH,
    NS,
    Api,
    Proc,
    eventually,
    kube_emulator,
    list_workers,
    pod_manifest,
    router_labels,
    router_process,
    start_operator,
)
from server_process import free_port

from radixfleet.operator import names

STS_PATH = f"/apis/apps/v1/namespaces/{NS}/statefulsets"
PODS_PATH = f"/api/v1/namespaces/{NS}/pods"
RANK0_HOSTS = ("127.0.0.21", "127.0.0.22", "127.0.0.23")
OPERATOR_CONFIG = dict(resync_seconds=1, drain_timeout_seconds=5, drain_poll_seconds=0.1, retry_delay_seconds=1,
                       autoscale_interval_seconds=3600, group_restart_backoff_seconds=1)
FAKE_WORKER = Path(__file__).resolve().parents[1] / "fake_worker.py"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def fleet():
    """A router, and a fake worker on each rank-0 address (one port, like pods)."""
    port, router_port = free_port(), free_port()
    logdir = tempfile.mkdtemp(prefix="rf-groups-")
    workers = [Proc([sys.executable, str(FAKE_WORKER), "--host", h, "--port", str(port)], f"http://{h}:{port}",
                    log_path=f"{logdir}/{h}.log").start() for h in RANK0_HOSTS]
    router = router_process(router_port, "127.0.0.1", f"{logdir}/router.log").start()
    try:
        for p in (*workers, router):
            p.wait(30)
        yield router, port, router_port
    finally:
        for p in (*workers, router):
            p.stop()


def isvc(engine_port: int, router_port: int, **spec) -> dict:
    return {
        "apiVersion": "radixfleet.io/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "big", "namespace": NS, "uid": "uid-big"},
        "spec": {"model": {"path": "/models"}, "port": engine_port, "router": {"port": router_port},
                 "replicas": 2, "tensorParallelSize": 4, "nodesPerReplica": 2, **spec},
    }


async def start_group(api: Api, group: str, rank0_ip: str, replica_ip: str) -> list[str]:
    """What the StatefulSet controller and the kubelet do: a pod per rank, Ready."""
    sts = await eventually(lambda: api.get(f"{STS_PATH}/{group}"), what=f"StatefulSet {group}")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    pods = []
    for rank, ip in enumerate((rank0_ip, replica_ip)):
        name = f"{group}-{rank}"
        await api.create(PODS_PATH, pod_manifest(name, NS, {**labels, names.LABEL_POD_INDEX: str(rank)}, ip, ready=True))
        pods.append(name)
    return pods


async def annotations(api: Api, group: str) -> dict:
    sts = await api.get(f"{STS_PATH}/{group}")
    return (sts or {}).get("metadata", {}).get("annotations") or {}


async def condition(api: Api, type_: str) -> dict:
    status = (await api.get(f"{ISVC_PATH}/big") or {}).get("status") or {}
    return next((c for c in status.get("conditions") or () if c["type"] == type_), {})


def events(emulator, reason: str) -> list[dict]:
    return [dict(o) for (res, _, _), o in emulator.objects.items()
            if getattr(res, "plural", None) == "events" and not o.deleted and o.get("reason") == reason]


def router_at_deletes(emulator, router_url: str, paths: list[str]) -> list[set[str]]:
    """The router's worker list each time one of the objects at `paths` is deleted."""
    seen: list[set[str]] = []

    async def spy(request):
        seen.append(list_workers(router_url))

    for path in paths:
        emulator[f"delete {path}"] << spy
    return seen


@contextlib.asynccontextmanager
async def serving_two_groups(fleet) -> AsyncIterator[tuple[Any, Api, list[str], list[str]]]:
    """The operator on KMock with an InferenceService of two 2-node groups, both registered;
    yields the emulator, the API and each group's pods."""
    router, port, router_port = fleet
    async with kube_emulator() as (emulator, server):
        api = Api(server)
        operator = await start_operator(server, **OPERATOR_CONFIG)
        try:
            await api.create(ISVC_PATH, isvc(port, router_port))
            await api.create(PODS_PATH, pod_manifest("big-router-x", NS, router_labels("big"), "127.0.0.1", ready=True))
            group0 = await start_group(api, "big-engine-0", RANK0_HOSTS[0], "127.0.1.1")
            group1 = await start_group(api, "big-engine-1", RANK0_HOSTS[1], "127.0.1.2")
            urls = {f"http://{h}:{port}" for h in RANK0_HOSTS[:2]}
            await eventually(lambda: list_workers(router.url) == urls, what="rank 0 of both groups registered")
            yield emulator, api, group0, group1
        finally:
            await operator.stop()
            await api.close()


async def test_a_group_with_a_dead_or_deleted_rank_restarts_whole(fleet):
    router, port, _ = fleet
    w0, w1 = (f"http://{h}:{port}" for h in RANK0_HOSTS[:2])
    async with serving_two_groups(fleet) as (emulator, api, group0, group1):
        for group in ("big-engine-0", "big-engine-1"):
            await eventually(lambda g=group: _members(annotations(api, g)), what=f"{group}'s ranks recorded")
        assert (await condition(api, "GroupsWhole"))["status"] == "True"

        # 1. Rank 1 of group 1 is deleted: rank 0 leaves the router before it is deleted too.
        seen = router_at_deletes(emulator, router.url, [f"{PODS_PATH}/{p}" for p in group1])
        await api.delete(f"{PODS_PATH}/big-engine-1-1")
        await eventually(lambda: _gone(api, f"{PODS_PATH}/big-engine-1-0"), what="rank 0 deleted by the operator")
        assert seen[-1] == {w0}, f"router list when the operator deleted rank 0: {seen}"
        assert list_workers(router.url) == {w0}
        (event,) = await eventually(lambda: events(emulator, "GroupRestart"), what="GroupRestart event")
        assert "big-engine-1" in event["message"] and "rank 1 (pod big-engine-1-1) was deleted" in event["message"]
        cond = await eventually(lambda: _cond_is(api, "GroupsWhole", "False"), what="GroupsWhole False")
        assert cond["reason"] == "GroupRestarting" and "big-engine-1" in cond["message"]

        # The StatefulSet controller brings every rank back: registered again once rank 0 is Ready.
        await start_group(api, "big-engine-1", RANK0_HOSTS[1], "127.0.1.2")
        await eventually(lambda: list_workers(router.url) == {w0, w1}, what="group 1 registered again")
        await eventually(lambda: events(emulator, "GroupRecovered"), what="GroupRecovered event")
        await eventually(lambda: _cond_is(api, "GroupsWhole", "True"), what="GroupsWhole True again")

        # 2. A rank of group 0 dies (its container restarts): the same, and no stale rank is left.
        seen = router_at_deletes(emulator, router.url, [f"{PODS_PATH}/{p}" for p in group0])
        await api.patch(f"{PODS_PATH}/big-engine-0-1", {"status": {"containerStatuses": [
            {"name": "engine", "restartCount": 1, "ready": True, "image": "x", "imageID": "", "started": True}]}})
        for pod in group0:
            await eventually(lambda p=pod: _gone(api, f"{PODS_PATH}/{p}"), what=f"{pod} deleted")
        assert seen and all(w0 not in s for s in seen), seen
        await eventually(lambda: [e for e in events(emulator, "GroupRestart") if "restarted its container 1 time(s)" in e["message"]],
                         what="GroupRestart event for the dead rank")
        await start_group(api, "big-engine-0", RANK0_HOSTS[0], "127.0.1.1")
        await eventually(lambda: list_workers(router.url) == {w0, w1}, what="group 0 registered again")


async def test_a_new_template_rolls_one_group_at_a_time_registered_before_the_old_goes(fleet):
    router, port, _ = fleet
    w0, w1, w2 = (f"http://{h}:{port}" for h in RANK0_HOSTS)
    async with serving_two_groups(fleet) as (emulator, api, old0, _):
        old_template = (await api.get(f"{STS_PATH}/big-engine-0"))["spec"]["template"]
        assert (await api.get(f"{STS_PATH}/big-engine-0"))["spec"]["updateStrategy"] == {"type": "OnDelete"}

        seen = router_at_deletes(emulator, router.url, [f"{STS_PATH}/big-engine-0"])
        await api.patch(f"{ISVC_PATH}/big", {"spec": {"engineArgs": ["--chunked-prefill-size", "1024"]}})
        new0 = await eventually(lambda: api.get(f"{STS_PATH}/big-engine-0b"), what="replacement group for replica 0")
        assert "--chunked-prefill-size" in new0["spec"]["template"]["spec"]["containers"][0]["args"]
        args = new0["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--dist-init-addr") + 1].startswith("big-engine-0b-0.big-engine-0b.")
        await eventually(lambda: events(emulator, "GroupRollout"), what="GroupRollout event")
        # The old group keeps its template and serves; replica 1 waits its turn.
        assert (await api.get(f"{STS_PATH}/big-engine-0"))["spec"]["template"] == old_template
        assert await api.get(f"{STS_PATH}/big-engine-1b") is None
        assert list_workers(router.url) == {w0, w1}

        await start_group(api, "big-engine-0b", RANK0_HOSTS[2], "127.0.1.3")
        await eventually(lambda: _gone(api, f"{STS_PATH}/big-engine-0"), what="old group 0 deleted")
        assert seen == [{w1, w2}], f"router list when the old group was deleted: {seen}"
        await eventually(lambda: _gone(api, f"/api/v1/namespaces/{NS}/services/big-engine-0"), what="old headless Service deleted")
        for pod in old0:  # the garbage collector's part
            await api.delete(f"{PODS_PATH}/{pod}")

        await eventually(lambda: api.get(f"{STS_PATH}/big-engine-1b"), what="then the replacement for replica 1")
        await start_group(api, "big-engine-1b", RANK0_HOSTS[0], "127.0.1.1")
        await eventually(lambda: _gone(api, f"{STS_PATH}/big-engine-1"), what="old group 1 deleted")
        await eventually(lambda: list_workers(router.url) == {w2, w0}, what="only the new groups registered")
        assert len(events(emulator, "GroupReplaced")) == 2


async def _members(pending) -> bool:
    return bool((await pending).get(names.ANNOTATION_MEMBERS))


async def _gone(api: Api, path: str) -> bool:
    return await api.get(path) is None


async def _cond_is(api: Api, type_: str, status: str) -> dict | None:
    cond = await condition(api, type_)
    return cond if cond.get("status") == status else None
