"""Voluntary disruptions lose no request: a rollout of every replica and an eviction, under
continuous load, with real engines behind the real router and the real operator on KMock.

The test plays the Deployment controller (maxSurge 1, maxUnavailable 0: the new pod is
started and Ready before an old one is deleted) and the kubelet (for each pod: start a
`radixfleet serve` on the pod's loopback IP, mark it Ready; on deletion, as the kubelet
does: deletionTimestamp set, the preStop sleep from the pod template, SIGTERM, wait for the
process to exit, then the pod object goes away). The operator must take a terminating pod
out of the router before its preStop ends; the engine drains what it still has; the
router retries what an engine refused. The load client counts failures (must be 0) and
prints the figures as one JSON line.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import tempfile
import time
from dataclasses import dataclass, field

import httpx
import pytest
from kube_harness import (
    ISVC_PATH,
    NS,
    Api,
    Proc,
    engine_labels,
    engine_process,
    engine_server_available,
    eventually,
    kube_emulator,
    list_workers,
    pod_manifest,
    router_labels,
    router_process,
    start_operator,
)
from server_process import SERVER_ARGS, free_port

DEPLOYMENT_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/chat-engine"
PODS_PATH = f"/api/v1/namespaces/{NS}/pods"
KUBELET_FINALIZER = "test.radixfleet.io/kubelet"  # keeps a deleted pod until its process exits, as the kubelet does
OPERATOR_CONFIG = dict(resync_seconds=2, drain_timeout_seconds=10, drain_poll_seconds=0.1, retry_delay_seconds=1,
                       autoscale_interval_seconds=3600)
DISRUPTION = {"preStopSeconds": 2, "drainTimeoutSeconds": 30}
LOAD_CONCURRENCY = 2

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not engine_server_available(), reason="the engine server is needed behind the router"),
]


@dataclass
class Load:
    """Closed-loop clients sending /generate through the router until stopped."""

    url: str
    done: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, status)
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, c: httpx.AsyncClient, n: int) -> None:
        for i in itertools.count():
            if self.stop.is_set():
                return
            body = {"text": f"Client {n}, request {i}: name a colour.", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
            start = time.monotonic()
            try:
                resp = await c.post(self.url + "/generate", json=body)
                status, detail = resp.status_code, resp.text[:200]
            except httpx.HTTPError as e:
                status, detail = 0, repr(e)
            self.done.append((start, time.monotonic(), status))
            if status != 200:
                self.failures.append(f"{status}: {detail}")

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=120, trust_env=False) as c:
            await asyncio.gather(*(self.client(c, n) for n in range(LOAD_CONCURRENCY)))

    def figures(self, since: float) -> dict:
        window = sorted((s, e, st) for s, e, st in self.done if e >= since)
        ends = [e for _, e, _ in window]
        gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
        return {"requests": len(window), "failed": sum(st != 200 for _, _, st in window),
                "longest_stall_s": round(max(gaps, default=0.0), 2),
                "max_latency_s": round(max((e - s for s, e, _ in window), default=0.0), 2)}


class Kubelet:
    """Runs one real engine per engine pod, on the pod's loopback IP."""

    def __init__(self, api: Api, port: int, logdir: str) -> None:
        self.api, self.port, self.logdir = api, port, logdir
        self.procs: dict[str, Proc] = {}
        self.ips = (f"127.0.0.{i}" for i in itertools.count(11))
        self.exit_codes: dict[str, tuple[int, float]] = {}

    async def start_pods(self, names: list[str], template: dict) -> list[str]:
        """Create the pods (not Ready), start their engines, mark each Ready once it answers."""
        args = template["spec"]["containers"][0]["args"]
        drain = args[args.index("--drain-timeout") + 1]
        for name in names:
            ip = next(self.ips)
            pod = pod_manifest(name, NS, engine_labels("chat"), ip, ready=False,
                               created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            pod["metadata"]["finalizers"] = [KUBELET_FINALIZER]
            pod["spec"] = template["spec"]
            await self.api.create(PODS_PATH, pod)
            self.procs[name] = engine_process(ip, self.port, "smollm2", f"{self.logdir}/{name}.log",
                                              "--drain-timeout", drain, *SERVER_ARGS).start()
        for name in names:
            await asyncio.to_thread(self.procs[name].wait, 180)
            await self.api.set_ready(NS, name, True)
        return [self.procs[n].url for n in names]

    async def terminate(self, name: str) -> None:
        """Graceful pod deletion: deletionTimestamp, preStop, SIGTERM, exit, pod gone."""
        pod = await self.api.get(f"{PODS_PATH}/{name}")
        container = pod["spec"]["containers"][0]
        pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        await self.api.delete(f"{PODS_PATH}/{name}")  # the finalizer keeps it, terminating
        await asyncio.sleep(pre_stop)
        proc = self.procs.pop(name).proc
        assert proc is not None
        t0 = time.monotonic()
        proc.terminate()
        code = await asyncio.to_thread(proc.wait, grace - pre_stop)
        self.exit_codes[name] = (code, time.monotonic() - t0)
        await self.api.patch(f"{PODS_PATH}/{name}", {"metadata": {"finalizers": []}})

    def stop_all(self) -> None:
        for p in self.procs.values():
            p.stop()


def isvc(engine_port: int, router_port: int, **spec) -> dict:
    return {
        "apiVersion": "radixfleet.io/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": NS, "uid": "uid-chat"},
        "spec": {"model": {"path": "smollm2"}, "port": engine_port, "replicas": 2, "router": {"port": router_port},
                 "disruption": DISRUPTION, **spec},
    }


async def test_rollout_and_eviction_under_load_fail_no_request():
    engine_port, router_port = free_port(), free_port()
    logdir = tempfile.mkdtemp(prefix="rf-disruption-")
    router = router_process(router_port, "127.0.0.1", f"{logdir}/router.log").start()
    async with kube_emulator() as (emulator, server):
        api = Api(server)
        kubelet = Kubelet(api, engine_port, logdir)
        operator = await start_operator(server, **OPERATOR_CONFIG)
        load: Load | None = None
        try:
            await asyncio.to_thread(router.wait, 30)
            await api.create(ISVC_PATH, isvc(engine_port, router_port))
            deploy = await eventually(lambda: api.get(DEPLOYMENT_PATH), what="engine Deployment")
            assert deploy["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
            pod_spec = deploy["spec"]["template"]["spec"]
            assert pod_spec["terminationGracePeriodSeconds"] >= DISRUPTION["preStopSeconds"] + DISRUPTION["drainTimeoutSeconds"]
            pdb = await eventually(lambda: api.get(f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/chat-engine"), what="PDB")
            assert pdb["spec"]["maxUnavailable"] == 1
            await api.create(PODS_PATH, pod_manifest("chat-router-x", NS, router_labels("chat"), "127.0.0.1", ready=True))
            old = await kubelet.start_pods(["chat-engine-a", "chat-engine-b"], deploy["spec"]["template"])
            await eventually(lambda: list_workers(router.url) == set(old), what="both engines registered")

            load = Load(router.url)
            load_task = asyncio.create_task(load.run())
            await eventually(lambda: len(load.done) >= 4, timeout=60, what="load flowing")

            # Rollout: a new engine flag changes the pod template; replace one pod at a time.
            t_rollout = time.monotonic()
            await api.patch(f"{ISVC_PATH}/chat", {"spec": {"engineArgs": ["--random-seed", "7"]}})
            deploy = await eventually(lambda: _template_has(api, "--random-seed"), what="Deployment template updated")
            new: list[str] = []
            for old_pod, new_pod in (("chat-engine-a", "chat-engine-c"), ("chat-engine-b", "chat-engine-d")):
                new += await kubelet.start_pods([new_pod], deploy["spec"]["template"])
                await kubelet.terminate(old_pod)
            await eventually(lambda: list_workers(router.url) == set(new), what="only the new engines registered")
            rollout = load.figures(t_rollout)

            # Eviction of one pod (the PDB allows one): the other serves everything.
            t_evict = time.monotonic()
            await kubelet.terminate("chat-engine-c")
            await eventually(lambda: list_workers(router.url) == {new[1]}, what="evicted engine deregistered")
            await asyncio.sleep(2)
            eviction = load.figures(t_evict)

            load.stop.set()
            await load_task
            print(json.dumps({"test": "disruption", "rollout": rollout, "eviction": eviction, "exits": kubelet.exit_codes}))
            assert load.failures == [], load.failures[:5]
            assert rollout["failed"] == 0 and eviction["failed"] == 0
            assert rollout["requests"] > 0 and eviction["requests"] > 0
            for name, (code, took) in kubelet.exit_codes.items():
                assert code == 0, f"{name} exited with {code}"
                assert took < DISRUPTION["drainTimeoutSeconds"], f"{name} took {took:.1f} s to drain"
        finally:
            if load is not None:
                load.stop.set()
            await operator.stop()
            kubelet.stop_all()
            router.stop()
            await api.close()


async def _template_has(api: Api, flag: str) -> dict | None:
    deploy = await api.get(DEPLOYMENT_PATH)
    return deploy if flag in deploy["spec"]["template"]["spec"]["containers"][0]["args"] else None
