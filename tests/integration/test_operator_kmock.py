"""The real operator loop (kopf) on KMock, a real router process and real engine servers.

KMock plays the API server; the test plays the controllers and the kubelet (it creates
the pods a Deployment/StatefulSet would and flips their Ready condition). Engine pod IPs
are loopback addresses (127.0.0.11, ...) where real `radixfleet serve` processes listen,
so the router's own health checks pass exactly as in a cluster.
"""

from __future__ import annotations

import tempfile

import httpx
import pytest
from kube_harness import (
    ISVC_PATH,
    NS,
    Api,
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
from server_process import free_port

from radixfleet.operator import names

ENGINE_HOSTS = ("127.0.0.11", "127.0.0.12")
OPERATOR_CONFIG = dict(resync_seconds=1.5, drain_timeout_seconds=5, drain_poll_seconds=0.1, retry_delay_seconds=1,
                       autoscale_interval_seconds=3600)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def engines():
    """Real engine servers on two loopback addresses, one port (like two pods)."""
    if not engine_server_available():
        pytest.skip("radixfleet.engine.server.serve cannot be imported yet: the engine server is needed behind the router")
    port = free_port()
    logdir = tempfile.mkdtemp(prefix="rf-operator-engines-")
    procs = []
    for host in ENGINE_HOSTS:
        procs.append(engine_process(host, port, log_path=f"{logdir}/{host}.log").start())
    try:
        for p in procs:
            p.wait(180)
        yield port
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
def router():
    port = free_port()
    proc = router_process(port, log_path=tempfile.mktemp(prefix="rf-router-", suffix=".log")).start().wait(30)
    yield proc, port
    proc.stop()


def api_removals(router_url: str) -> float:
    text = httpx.get(f"{router_url}/metrics", timeout=5, trust_env=False).text
    line = next((x for x in text.splitlines() if x.startswith('radixfleet_router_worker_removals_total{reason="api"}')), None)
    return float(line.split()[-1]) if line else 0.0


def isvc(name: str, engine_port: int, router_port: int, **spec) -> dict:
    return {
        "apiVersion": "radixfleet.io/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}"},
        "spec": {"model": {"path": "smollm2"}, "port": engine_port, "router": {"port": router_port}, **spec},
    }


CHILD_PLURALS = {"deployments", "statefulsets", "services", "servicemonitors"}


def child_writes(emulator) -> list[str]:
    """'METHOD path' of every write made to child objects (Deployments, Services, ...)."""
    return [f"{r.method.value} {r.url.path}" for r in list(emulator)
            if r.method.value in ("POST", "PATCH", "PUT", "DELETE") and r.resource is not None
            and r.resource.plural in CHILD_PLURALS]


async def test_single_node_lifecycle(engines, router):
    router_proc, router_port = router
    engine_port = engines
    w1, w2 = (f"http://{h}:{engine_port}" for h in ENGINE_HOSTS)
    async with kube_emulator() as (emulator, server):
        api = Api(server)
        operator = await start_operator(server, **OPERATOR_CONFIG)
        try:
            # 1. Create: children appear, owned, with the expected command lines.
            await api.create(ISVC_PATH, isvc("chat", engine_port, router_port, replicas=2, monitoring={"serviceMonitor": True}))
            deploy = await eventually(lambda: api.get(f"/apis/apps/v1/namespaces/{NS}/deployments/chat-engine"), what="engine Deployment")
            router_deploy = await eventually(lambda: api.get(f"/apis/apps/v1/namespaces/{NS}/deployments/chat-router"), what="router Deployment")
            for path in ("/api/v1/namespaces/ml/services/chat-router", "/api/v1/namespaces/ml/services/chat-engine",
                         "/api/v1/namespaces/ml/services/chat-router-peers",
                         "/apis/monitoring.coreos.com/v1/namespaces/ml/servicemonitors/chat"):
                obj = await eventually(lambda p=path: api.get(p), what=path)
                assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
            assert deploy["metadata"]["ownerReferences"][0] == {
                "apiVersion": "radixfleet.io/v1alpha1", "kind": "InferenceService", "name": "chat", "uid": "uid-chat",
                "controller": True, "blockOwnerDeletion": True}
            assert deploy["spec"]["replicas"] == 2
            args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
            assert args[:3] == ["serve", "--model-path", "smollm2"] and args[args.index("--port") + 1] == str(engine_port)
            rargs = router_deploy["spec"]["template"]["spec"]["containers"][0]["args"]
            assert rargs[:2] == ["router", "--host"] and rargs[rargs.index("--policy") + 1] == "auto"
            assert args[args.index("--kv-events-port") + 1] == "5557"  # every router pod subscribes
            assert rargs[rargs.index("--peers") + 1] == "dns://chat-router-peers:5558"  # router pods announce to each other

            # 2. Pods scheduled (not Ready yet): nothing registered. Then Ready: both registered.
            await api.create(f"/api/v1/namespaces/{NS}/pods", pod_manifest("chat-router-x", NS, router_labels("chat"), "127.0.0.1", ready=True))
            for i, host in enumerate(ENGINE_HOSTS):
                await api.create(f"/api/v1/namespaces/{NS}/pods", pod_manifest(
                    f"chat-engine-{i}", NS, engine_labels("chat"), host, ready=False, created=f"2026-01-01T00:00:0{i}Z"))
            await eventually(lambda: _status(api, "chat", "phase", "Pending"), what="phase Pending")
            assert list_workers(router_proc.url) == set()
            for i in range(2):
                await api.set_ready(NS, f"chat-engine-{i}", True)
            await eventually(lambda: list_workers(router_proc.url) == {w1, w2}, what="both workers registered")
            status = await eventually(lambda: _status(api, "chat", "phase", "Ready"), what="phase Ready")
            assert status["readyReplicas"] == 2 and status["workers"] == sorted([w1, w2])
            assert status["url"] == f"http://chat-router.{NS}.svc.cluster.local:{router_port}"
            conditions = {c["type"]: c for c in status["conditions"]}
            assert conditions["Ready"]["status"] == "True" and conditions["EngineReady"]["reason"] == "AllReplicasReady"
            events = await eventually(lambda: _events(emulator, "WorkerRegistered", 2), what="WorkerRegistered events")
            assert {e["involvedObject"]["name"] for e in events} == {"chat"}

            # 3. Scale down: the victim leaves the router (and drains) before the Deployment shrinks.
            seen_at_patch: list[set[str]] = []

            async def spy(request):
                if (request.data or {}).get("spec", {}).get("replicas") == 1:
                    seen_at_patch.append(list_workers(router_proc.url))

            emulator[f"patch /apis/apps/v1/namespaces/{NS}/deployments/chat-engine"] << spy
            # What `kubectl scale isvc/chat --replicas=1` (or an HPA) does: patch the scale subresource.
            await api.patch(f"{ISVC_PATH}/chat/scale", {"spec": {"replicas": 1}})
            await eventually(lambda: _replicas(api, "chat-engine", 1), what="Deployment scaled to 1")
            assert seen_at_patch and seen_at_patch[0] == {w1}, f"router list when the Deployment changed: {seen_at_patch}"
            victim = await api.get(f"/api/v1/namespaces/{NS}/pods/chat-engine-1")  # newest pod goes first
            assert victim["metadata"]["annotations"][names.ANNOTATION_DRAINING] == "true"
            assert victim["metadata"]["annotations"][names.ANNOTATION_DELETION_COST] == "-1000"
            await api.delete(f"/api/v1/namespaces/{NS}/pods/chat-engine-1")  # the ReplicaSet removes it
            status = await eventually(lambda: _status(api, "chat", "workers", [w1]), what="status.workers == [w1]")
            assert status["phase"] == "Ready" and status["readyReplicas"] == 1
            await eventually(lambda: _status(api, "chat", "observedGeneration", 2), what="observedGeneration 2")
            assert list_workers(router_proc.url) == {w1}

            # 4. Scale up again; then the new pod vanishes with no watch event: the resync repairs.
            await api.patch(f"{ISVC_PATH}/chat", {"spec": {"replicas": 2}})
            await eventually(lambda: _replicas(api, "chat-engine", 2), what="Deployment scaled to 2")
            await api.create(f"/api/v1/namespaces/{NS}/pods", pod_manifest("chat-engine-2", NS, engine_labels("chat"), ENGINE_HOSTS[1], ready=True))
            await eventually(lambda: list_workers(router_proc.url) == {w1, w2}, what="replacement registered")
            emulator.objects["v1/pods", NS, "chat-engine-2"].delete()  # storage only: no watch event is sent
            await eventually(lambda: list_workers(router_proc.url) == {w1}, timeout=10, what="resync removed the vanished pod")
            await eventually(lambda: _status(api, "chat", "workers", [w1]), what="status follows")

            # 5. Operator restart: no duplicates, no churn, nothing removed from the router.
            await api.create(f"/api/v1/namespaces/{NS}/pods", pod_manifest("chat-engine-3", NS, engine_labels("chat"), ENGINE_HOSTS[1], ready=True))
            await eventually(lambda: list_workers(router_proc.url) == {w1, w2}, what="re-registered")
            await eventually(lambda: _status(api, "chat", "workers", sorted([w1, w2])), what="status has both")
            await operator.stop()
            writes_before, removals_before = len(child_writes(emulator)), api_removals(router_proc.url)
            operator = await start_operator(server, **OPERATOR_CONFIG)
            import asyncio

            await asyncio.sleep(4)  # > 2 resync periods
            assert child_writes(emulator)[writes_before:] == []
            assert api_removals(router_proc.url) == removals_before
            assert list_workers(router_proc.url) == {w1, w2}
            deployments = (await api.get(f"/apis/apps/v1/namespaces/{NS}/deployments"))["items"]
            assert sorted(d["metadata"]["name"] for d in deployments) == ["chat-engine", "chat-router"]

            # 6. The router restarts (empty list): the operator notices and rebuilds it.
            router_proc.stop()
            router_proc.start().wait(30)
            await eventually(lambda: list_workers(router_proc.url) == {w1, w2}, timeout=15, what="router list rebuilt")
            await eventually(lambda: _events(emulator, "RouterRestarted", 1), what="RouterRestarted event")

            # 7. peerPort 0: the peers Service is pruned and the router pods lose the flags and the port.
            await api.patch(f"{ISVC_PATH}/chat", {"spec": {"router": {"peerPort": 0}}})
            await eventually(lambda: _gone(api, f"/api/v1/namespaces/{NS}/services/chat-router-peers"), what="peers Service deleted")
            router_deploy = await api.get(f"/apis/apps/v1/namespaces/{NS}/deployments/chat-router")
            container = router_deploy["spec"]["template"]["spec"]["containers"][0]
            assert "--peers" not in container["args"] and [p["name"] for p in container["ports"]] == ["http"]
            assert await api.get("/api/v1/namespaces/ml/services/chat-router")
        finally:
            await operator.stop()
            await api.close()


async def test_multi_node_registers_rank_zero_and_drains_before_deleting(engines, router):
    router_proc, router_port = router
    engine_port = engines
    async with kube_emulator() as (emulator, server):
        api = Api(server)
        operator = await start_operator(server, **OPERATOR_CONFIG)
        try:
            await api.create(ISVC_PATH, isvc("big", engine_port, router_port, replicas=2, tensorParallelSize=4, nodesPerReplica=2))
            for r in range(2):
                sts = await eventually(lambda r=r: api.get(f"/apis/apps/v1/namespaces/{NS}/statefulsets/big-engine-{r}"), what=f"sts {r}")
                assert sts["metadata"]["ownerReferences"][0]["uid"] == "uid-big"
                args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
                assert args[args.index("--dist-init-addr") + 1] == f"big-engine-{r}-0.big-engine-{r}.{NS}.svc:5000"
                assert args[args.index("--nnodes") + 1] == "2"
                await eventually(lambda r=r: api.get(f"/api/v1/namespaces/{NS}/services/big-engine-{r}"), what=f"headless svc {r}")
            await api.create(f"/api/v1/namespaces/{NS}/pods", pod_manifest("big-router-x", NS, router_labels("big"), "127.0.0.1", ready=True))
            # Rank 0 of each replica serves HTTP (real engines); rank 1 pods have no server behind them.
            for r, host in enumerate(ENGINE_HOSTS):
                for rank, ip in ((0, host), (1, f"127.0.1.{r + 1}")):
                    labels = engine_labels("big", **{names.LABEL_REPLICA: str(r), names.LABEL_POD_INDEX: str(rank)})
                    await api.create(f"/api/v1/namespaces/{NS}/pods", pod_manifest(f"big-engine-{r}-{rank}", NS, labels, ip, ready=True))
            urls = [f"http://{h}:{engine_port}" for h in ENGINE_HOSTS]
            await eventually(lambda: list_workers(router_proc.url) == set(urls), what="rank-0 pods registered")

            seen_at_delete: list[set[str]] = []

            async def spy(request):
                seen_at_delete.append(list_workers(router_proc.url))

            emulator[f"delete /apis/apps/v1/namespaces/{NS}/statefulsets/big-engine-1"] << spy
            await api.patch(f"{ISVC_PATH}/big", {"spec": {"replicas": 1}})
            await eventually(lambda: _gone(api, f"/apis/apps/v1/namespaces/{NS}/statefulsets/big-engine-1"), what="sts 1 deleted")
            assert seen_at_delete == [{urls[0]}], f"router list when the StatefulSet was deleted: {seen_at_delete}"
            await eventually(lambda: _gone(api, f"/api/v1/namespaces/{NS}/services/big-engine-1"), what="headless svc 1 deleted")
            assert await api.get(f"/apis/apps/v1/namespaces/{NS}/statefulsets/big-engine-0")
        finally:
            await operator.stop()
            await api.close()


async def test_autoscaler_scales_idle_replicas_down_and_defers_to_an_hpa(engines, router):
    """Idle real engines (0 queued) -> the timer lowers spec.replicas to minReplicas, then the
    reconciler drains; with `external: true` spec.replicas is left to the HPA."""
    router_proc, router_port = router
    engine_port = engines
    w1, w2 = (f"http://{h}:{engine_port}" for h in ENGINE_HOSTS)
    scaling = {"minReplicas": 1, "maxReplicas": 3, "metric": "queuedRequests", "target": 4, "scaleDownStabilizationSeconds": 0}
    async with kube_emulator() as (emulator, server):
        api = Api(server)
        operator = await start_operator(server, **{**OPERATOR_CONFIG, "autoscale_interval_seconds": 1})
        try:
            await api.create(ISVC_PATH, isvc("auto", engine_port, router_port, replicas=2, autoscaling=scaling))
            await api.create(ISVC_PATH, isvc("hpa", engine_port, router_port, replicas=2, autoscaling={**scaling, "external": True}))
            await api.create(f"/api/v1/namespaces/{NS}/pods", pod_manifest("auto-router-x", NS, router_labels("auto"), "127.0.0.1", ready=True))
            for i, host in enumerate(ENGINE_HOSTS):
                for svc in ("auto", "hpa"):
                    await api.create(f"/api/v1/namespaces/{NS}/pods", pod_manifest(
                        f"{svc}-engine-{i}", NS, engine_labels(svc), host, ready=True, created=f"2026-01-01T00:00:0{i}Z"))
            await eventually(lambda: _spec_replicas(api, "auto", 1), timeout=20, what="autoscaler set replicas to 1")
            await eventually(lambda: _events(emulator, "Autoscaled", 1), what="Autoscaled event")
            await eventually(lambda: _replicas(api, "auto-engine", 1), what="Deployment follows")
            await eventually(lambda: list_workers(router_proc.url) == {w1}, what="the victim left the router")
            assert await _spec_replicas(api, "hpa", 2), "external autoscaling must leave spec.replicas to the HPA"
        finally:
            await operator.stop()
            await api.close()


KEYED_HOST, API_KEY = "127.0.0.13", "autoscale-test-key"


@pytest.fixture(scope="module")
def keyed_engine():
    """A real engine that requires an API key (on /metrics too) and runs one request at a time,
    so that concurrent requests queue up."""
    if not engine_server_available():
        pytest.skip("radixfleet.engine.server.serve cannot be imported yet")
    port = free_port()
    proc = engine_process(KEYED_HOST, port, "smollm2", tempfile.mktemp(prefix="rf-keyed-engine-", suffix=".log"),
                          "--api-key", API_KEY, "--max-running-requests", "1").start()
    try:
        proc.wait(180)
        yield proc.url, port
    finally:
        proc.stop()


async def test_autoscaler_reads_keyed_engines_and_scales_up_then_down(keyed_engine):
    """apiKeySecret: the engines answer /metrics with 401 unless the autoscaler sends the key
    from the Secret. A queue on the engine scales the service up; once it drains, back down."""
    import asyncio
    import base64

    from radixfleet.operator.autoscale import observe

    url, engine_port = keyed_engine
    assert httpx.get(f"{url}/metrics", timeout=5, trust_env=False).status_code == 401
    assert await observe([url], "queuedRequests") is None, "a refused scrape must not count as an idle engine"
    assert await observe([url], "queuedRequests", API_KEY) == 0.0
    scaling = {"minReplicas": 1, "maxReplicas": 2, "metric": "queuedRequests", "target": 2, "scaleDownStabilizationSeconds": 0}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keyed-api-key", "namespace": NS},
              "data": {"token": base64.b64encode(API_KEY.encode()).decode()}}
    async with kube_emulator() as (emulator, server):
        api = Api(server)
        operator = await start_operator(server, **{**OPERATOR_CONFIG, "autoscale_interval_seconds": 1})
        try:
            await api.create(f"/api/v1/namespaces/{NS}/secrets", secret)
            await api.create(ISVC_PATH, isvc("keyed", engine_port, free_port(), replicas=1, autoscaling=scaling,
                                             apiKeySecret={"name": "keyed-api-key", "key": "token"}))
            await api.create(f"/api/v1/namespaces/{NS}/pods", pod_manifest("keyed-engine-0", NS, engine_labels("keyed"), KEYED_HOST, ready=True))
            await asyncio.sleep(3)  # a few autoscaler periods on an idle engine: nothing changes
            assert await _spec_replicas(api, "keyed", 1)

            # Seven long requests, one running at a time: six queued per replica > target 2.
            body = {"text": "Count slowly:", "sampling_params": {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True}}
            async with httpx.AsyncClient(base_url=url, timeout=300, trust_env=False,
                                         headers={"Authorization": f"Bearer {API_KEY}"}) as client:
                burst = [asyncio.create_task(client.post("/generate", json=body)) for _ in range(7)]
                await eventually(lambda: _spec_replicas(api, "keyed", 2), timeout=30, what="autoscaler scaled up to 2")
                assert all(r.status_code == 200 for r in await asyncio.gather(*burst))
            await eventually(lambda: _spec_replicas(api, "keyed", 1), timeout=30, what="autoscaler scaled back down to 1")
            reasons = [e["message"] for e in await eventually(lambda: _events(emulator, "Autoscaled", 2), what="Autoscaled events")]
            assert any("replicas 1 -> 2" in m for m in reasons) and any("replicas 2 -> 1" in m for m in reasons), reasons
        finally:
            await operator.stop()
            await api.close()


POD_SETTINGS = {
    "nodeSelector": {"pool": "gpu"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
        "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {names.LABEL_SERVICE: "placed"}}}}]}},
    "priorityClassName": "inference",
    "imagePullSecrets": [{"name": "registry"}],
    "podLabels": {"team": "search"},
    "podAnnotations": {"example.com/owner": "search"},
    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
    "containerSecurityContext": {"readOnlyRootFilesystem": True},
    "serviceAccountName": "inference",
}


@pytest.mark.parametrize("nodes", [1, 2], ids=["deployment", "statefulsets"])
async def test_pod_settings_reach_every_pod_template(nodes):
    """Placement, identity, security, env, volumes and shmSize from the InferenceService land in
    the engine pods (the Deployment, or every replica's StatefulSet, i.e. every rank) and the
    router pods the operator creates, and those pods pass strict schema validation."""
    import kubernetes_validate

    engine_only = {"envFrom": [{"configMapRef": {"name": "nccl"}}], "shmSize": "8Gi",
                   "volumes": [{"name": "scratch", "emptyDir": {}}], "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}
    router_settings = {**POD_SETTINGS, "nodeSelector": {"pool": "cpu"}}
    async with kube_emulator() as (emulator, server):
        api = Api(server)
        operator = await start_operator(server, **OPERATOR_CONFIG)
        try:
            await api.create(ISVC_PATH, isvc("placed", 30000, 30001, replicas=2, tensorParallelSize=nodes, nodesPerReplica=nodes,
                                             **POD_SETTINGS, **engine_only, router={"port": 30001, **router_settings}))
            apps = f"/apis/apps/v1/namespaces/{NS}"
            engines = [f"{apps}/deployments/placed-engine"] if nodes == 1 else [f"{apps}/statefulsets/placed-engine-{r}" for r in range(2)]
            for path in [*engines, f"{apps}/deployments/placed-router"]:
                workload = await eventually(lambda p=path: api.get(p), what=path)
                for version in ("1.30.0", "1.34.0"):
                    kubernetes_validate.validate(workload, version, strict=True)
                template = workload["spec"]["template"]
                want = router_settings if path.endswith("router") else POD_SETTINGS
                for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets",
                              "securityContext", "serviceAccountName"):
                    assert template["spec"][field] == want[field], (path, field)
                assert template["metadata"]["annotations"] == want["podAnnotations"]
                assert template["metadata"]["labels"]["team"] == "search"
                assert template["metadata"]["labels"][names.LABEL_SERVICE] == "placed"
                for container in template["spec"]["containers"]:
                    assert container["securityContext"] == POD_SETTINGS["containerSecurityContext"]
                if path in engines:
                    (engine,) = template["spec"]["containers"]
                    assert engine["envFrom"] == engine_only["envFrom"]
                    assert {"name": "scratch", "mountPath": "/scratch"} in engine["volumeMounts"]
                    dshm = next(v for v in template["spec"]["volumes"] if v["name"] == "dshm")
                    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
        finally:
            await operator.stop()
            await api.close()


async def test_operator_command_line_runs_against_the_api():
    """`radixfleet operator` (the container's command) reconciles through its own process."""
    import asyncio
    import sys

    async with kube_emulator() as (emulator, server):
        api = Api(server)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "radixfleet", "operator", "--standalone", "--server", server,
            "--liveness", f"http://127.0.0.1:{free_port()}/healthz", "--resync-seconds", "1",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await api.create(ISVC_PATH, isvc("cli", 30000, 30001))
            deploy = await eventually(lambda: api.get(f"/apis/apps/v1/namespaces/{NS}/deployments/cli-engine"), what="Deployment")
            assert deploy["metadata"]["ownerReferences"][0]["name"] == "cli"
        finally:
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            await api.close()


async def test_invalid_spec_fails_permanently_with_a_reason():
    async with kube_emulator() as (emulator, server):
        api = Api(server)
        operator = await start_operator(server, **OPERATOR_CONFIG)
        try:
            bad = isvc("bad", 30000, 30001, tensorParallelSize=3, nodesPerReplica=2)
            await api.create(ISVC_PATH, bad)
            status = await eventually(lambda: _status(api, "bad", "phase", "Failed"), what="phase Failed")
            (cond,) = status["conditions"]
            assert cond["reason"] == "InvalidSpec" and "multiple of nodesPerReplica" in cond["message"]
            await eventually(lambda: _events(emulator, "InvalidSpec", 1), what="InvalidSpec event")
            assert await api.get(f"/apis/apps/v1/namespaces/{NS}/deployments/bad-engine") is None
        finally:
            await operator.stop()
            await api.close()


async def _status(api: Api, name: str, key: str, value):
    obj = await api.get(f"{ISVC_PATH}/{name}")
    status = (obj or {}).get("status") or {}
    return status if status.get(key) == value else None


async def _replicas(api: Api, name: str, want: int) -> bool:
    obj = await api.get(f"/apis/apps/v1/namespaces/{NS}/deployments/{name}")
    return (obj or {}).get("spec", {}).get("replicas") == want


async def _spec_replicas(api: Api, name: str, want: int) -> bool:
    obj = await api.get(f"{ISVC_PATH}/{name}")
    return (obj or {}).get("spec", {}).get("replicas") == want


async def _gone(api: Api, path: str) -> bool:
    return await api.get(path) is None


def _events(emulator, reason: str, count: int):
    events = [dict(o) for (res, _, _), o in emulator.objects.items()
              if getattr(res, "plural", None) == "events" and not o.deleted and o.get("reason") == reason]
    return events if len(events) >= count else None
