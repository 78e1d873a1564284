"""The pure builders: InferenceService spec -> manifests, checked against the Kubernetes
1.30 and 1.34 schemas in strict mode and for what the engine/router processes will see."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from radixfleet.engine.server.drain import LIVENESS_PATH
from radixfleet.operator import names
from radixfleet.operator.manifests.children import build_children
from radixfleet.operator.spec import SpecError, parse_spec

BASE = {
    "apiVersion": "radixfleet.io/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "chat", "namespace": "ml", "uid": "0b5a9f1e-1111-2222-3333-444455556666", "generation": 3},
    "spec": {"model": {"path": "smollm2"}, "replicas": 2},
}
MULTI = {
    **BASE,
    "spec": {
        "model": {"pvc": {"claimName": "models", "subPath": "llama"}, "servedName": "llama"},
        "replicas": 2, "tensorParallelSize": 16, "nodesPerReplica": 2,
        "resources": {"gpus": 8, "cpu": "32", "memory": "512Gi"},
        "apiKeySecret": {"name": "key"},
        "engineArgs": ["--chunked-prefill-size", "4096"],
        "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
        "nodeSelector": {"pool": "h100"},
        "router": {"replicas": 2, "serviceType": "LoadBalancer", "policy": "round_robin"},
    },
}
CASES = {
    "single-node": (BASE, False),
    "single-node-monitoring": (BASE, True),
    "multi-node": (MULTI, False),
    "multi-node-monitoring": (MULTI, True),
}


def children(body, monitor=False):
    return build_children(parse_spec(copy.deepcopy(body)), with_service_monitor=monitor)


def by_kind(manifests, kind):
    return [m for m in manifests if m["kind"] == kind]


@pytest.mark.parametrize("version", ["1.30.0", "1.34.0"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_manifest_passes_strict_schema_validation(case, version):
    body, monitor = CASES[case]
    manifests = children(body, monitor)
    for m in manifests:
        if m["kind"] == "ServiceMonitor":  # a CRD kind: no bundled schema, checked below
            continue
        kubernetes_validate.validate(m, version, strict=True)
    assert bool(by_kind(manifests, "ServiceMonitor")) == monitor


def test_every_child_is_owned_by_the_inference_service():
    for m in children(MULTI, True):
        (ref,) = m["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "radixfleet.io/v1alpha1", "kind": "InferenceService", "name": "chat",
                       "uid": BASE["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        assert m["metadata"]["namespace"] == "ml"
        assert m["metadata"]["labels"][names.LABEL_SERVICE] == "chat"


def test_single_node_is_one_deployment_with_the_engine_command_line():
    manifests = children(BASE)
    assert [(m["kind"], m["metadata"]["name"]) for m in manifests] == [
        ("Service", "chat-engine"), ("Deployment", "chat-engine"), ("Service", "chat-router"), ("Service", "chat-router-peers"),
        ("Deployment", "chat-router"),
        ("PodDisruptionBudget", "chat-engine"), ("PodDisruptionBudget", "chat-router"),
    ]
    deploy = manifests[1]
    assert deploy["spec"]["replicas"] == 2
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["radixfleet"]
    assert container["args"] == ["serve", "--model-path", "smollm2", "--host", "0.0.0.0", "--port", "30000", "--tp-size", "1",
                                 "--served-model-name", "chat", "--drain-timeout", "120",
                                 "--kv-events-port", "5557", "--kv-events-host", "0.0.0.0"]
    assert not by_kind(manifests, "StatefulSet")


@pytest.mark.parametrize("case", ["single-node", "multi-node"])
def test_kv_event_port_is_wired_from_engines_to_routers(case):
    """Issue #23: engines publish on spec.router.kvEventsPort (a named container port and a
    port of every engine Service), routers run auto; kvEventsPort 0 turns it all off."""
    from radixfleet.operator.registration import events_endpoint

    manifests = children(copy.deepcopy(CASES[case][0]))
    engine_pods = [m["spec"]["template"]["spec"] for m in manifests if m["kind"] in ("Deployment", "StatefulSet")
                   and m["metadata"]["name"] != "chat-router"]
    for pod in engine_pods:
        (c,) = pod["containers"]
        assert c["args"][c["args"].index("--kv-events-port") + 1] == "5557"
        assert {"name": "kv-events", "containerPort": 5557, "protocol": "TCP"} in c["ports"]
    for svc in by_kind(manifests, "Service"):
        names = [p["name"] for p in svc["spec"]["ports"]]
        assert ("kv-events" in names) == (not svc["metadata"]["name"].startswith("chat-router")), svc["metadata"]["name"]
    (router,) = [m for m in manifests if m["metadata"]["name"] == "chat-router" and m["kind"] == "Deployment"]
    rargs = router["spec"]["template"]["spec"]["containers"][0]["args"]
    assert rargs[rargs.index("--policy") + 1] == CASES[case][0]["spec"].get("router", {}).get("policy", "auto")
    assert events_endpoint("http://10.0.0.7:30000", 5557) == "tcp://10.0.0.7:5557"
    off = copy.deepcopy(CASES[case][0])
    off["spec"].setdefault("router", {})["kvEventsPort"] = 0
    manifests = children(off)
    assert events_endpoint("http://10.0.0.7:30000", 0) is None
    for m in manifests:
        text = str(m)
        assert "kv-events" not in text, m["metadata"]["name"]


def test_startup_probe_allows_a_slow_model_load():
    body = copy.deepcopy(BASE)
    body["spec"]["startupTimeoutSeconds"] = 3600
    container = children(body)[1]["spec"]["template"]["spec"]["containers"][0]
    probe = container["startupProbe"]
    assert probe["httpGet"] == {"path": "/health", "port": "http"}
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 3600
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("case", ["single-node", "multi-node"])
def test_engine_pods_leave_gracefully_and_budgets_cover_engines_and_routers(case):
    body = copy.deepcopy(CASES[case][0])
    body["spec"]["disruption"] = {"drainTimeoutSeconds": 45, "preStopSeconds": 7, "maxUnavailable": 2}
    manifests = children(body)
    workload = (by_kind(manifests, "StatefulSet") or by_kind(manifests, "Deployment"))[0]
    pod = workload["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # preStop keeps the pod serving while the routers drop it; then SIGTERM drains up to 45 s.
    assert container["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "7"]}}
    assert container["args"][container["args"].index("--drain-timeout") + 1] == "45"
    assert pod["terminationGracePeriodSeconds"] >= 7 + 45
    # Readiness fails while draining; liveness must not (the pod would be killed mid-drain).
    live, ready = container["livenessProbe"], container["readinessProbe"]
    if case == "single-node":
        assert (live["httpGet"]["path"], ready["httpGet"]["path"]) == (LIVENESS_PATH, "/health")
    else:
        assert LIVENESS_PATH in live["exec"]["command"][-1] and "/health" in ready["exec"]["command"][-1]
    pdbs = {m["metadata"]["name"]: m["spec"] for m in by_kind(manifests, "PodDisruptionBudget")}
    assert set(pdbs) == {"chat-engine", "chat-router"}
    for component in ("engine", "router"):
        assert pdbs[f"chat-{component}"]["maxUnavailable"] == 2
        assert pdbs[f"chat-{component}"]["selector"]["matchLabels"] == {names.LABEL_SERVICE: "chat", names.LABEL_COMPONENT: component}
    body["spec"]["disruption"] = {"preStopSeconds": 0}
    manifests = children(body)
    workload = (by_kind(manifests, "StatefulSet") or by_kind(manifests, "Deployment"))[0]
    assert "lifecycle" not in workload["spec"]["template"]["spec"]["containers"][0]


def test_multi_node_is_a_statefulset_and_headless_service_per_replica():
    manifests = children(MULTI)
    sts = by_kind(manifests, "StatefulSet")
    assert [s["metadata"]["name"] for s in sts] == ["chat-engine-0", "chat-engine-1"]
    assert not [d for d in by_kind(manifests, "Deployment") if d["metadata"]["name"] == "chat-engine"]
    headless = {s["metadata"]["name"]: s for s in by_kind(manifests, "Service")}
    for r, s in enumerate(sts):
        assert s["spec"]["replicas"] == 2  # nodesPerReplica
        assert s["spec"]["serviceName"] == f"chat-engine-{r}"
        assert headless[f"chat-engine-{r}"]["spec"]["clusterIP"] == "None"
        assert headless[f"chat-engine-{r}"]["spec"]["selector"][names.LABEL_REPLICA] == str(r)
        container = s["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        assert args[args.index("--dist-init-addr") + 1] == f"chat-engine-{r}-0.chat-engine-{r}.ml.svc:5000"
        assert args[args.index("--nnodes") + 1] == "2"
        assert args[args.index("--tp-size") + 1] == "16"
        assert args[args.index("--model-path") + 1] == "/models"
        # The rank is the pod ordinal, read from the StatefulSet's pod-index label.
        rank_env = args[args.index("--node-rank") + 1]
        env = {e["name"]: e for e in container["env"]}
        assert env[rank_env[2:-1]]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
        assert args[-2:] == ["--chunked-prefill-size", "4096"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        mount = next(m for m in container["volumeMounts"] if m["name"] == "model")
        assert mount["subPath"] == "llama" and mount["readOnly"]
    # The metrics Service selects only the serving rank-0 pods.
    assert headless["chat-engine"]["spec"]["selector"][names.LABEL_POD_INDEX] == "0"


def test_router_deployment_and_service_carry_the_router_settings():
    manifests = children(MULTI)
    router = next(m for m in by_kind(manifests, "Deployment") if m["metadata"]["name"] == "chat-router")
    assert router["spec"]["replicas"] == 2
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["router", "--host"]
    for flag, value in [("--policy", "round_robin"), ("--cache-threshold", "0.5"), ("--balance-abs-threshold", "32"),
                        ("--balance-rel-threshold", "1.0001"), ("--port", "30000"), ("--api-key", "$(RADIXFLEET_API_KEY)")]:
        assert args[args.index(flag) + 1] == value
    service = next(m for m in by_kind(manifests, "Service") if m["metadata"]["name"] == "chat-router")
    assert service["spec"]["type"] == "LoadBalancer"


def test_service_monitor_selects_the_engine_and_router_services():
    manifests = children(BASE, True)
    (monitor,) = by_kind(manifests, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [m["metadata"]["name"] for m in by_kind(manifests, "Service")
                if selector.items() <= m["metadata"]["labels"].items()]
    assert selected == ["chat-engine", "chat-router"]
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert all("http" in [p["name"] for p in s["spec"]["ports"]] for s in by_kind(manifests, "Service")
               if s["metadata"]["name"] in selected)


def test_service_monitor_sends_the_api_key_from_the_secret():
    """apiKeySecret: /metrics needs the key, so each endpoint carries bearer credentials from the
    same Secret, and the scraped Services say so (the chart's fleet monitor selects by it)."""
    keyed = children(MULTI, True)
    (monitor,) = by_kind(keyed, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["authorization"] == {"type": "Bearer", "credentials": {"name": "key", "key": "api-key"}}
    scraped = [s for s in by_kind(keyed, "Service") if s["metadata"]["labels"].get(names.LABEL_METRICS) == "true"]
    assert [s["metadata"]["name"] for s in scraped] == ["chat-engine", "chat-router"]
    assert all(s["metadata"]["labels"][names.LABEL_METRICS_AUTH] == "bearer" for s in scraped)
    (plain,) = by_kind(children(BASE, True), "ServiceMonitor")
    assert "authorization" not in plain["spec"]["endpoints"][0]
    assert not any(names.LABEL_METRICS_AUTH in s["metadata"]["labels"] for s in by_kind(children(BASE), "Service"))


def router_parts(body):
    """(router container, the peers Service or None) of the children built from `body`."""
    manifests = children(body)
    (deploy,) = [m for m in by_kind(manifests, "Deployment") if m["metadata"]["name"] == "chat-router"]
    peers = [m for m in by_kind(manifests, "Service") if m["metadata"]["name"] == "chat-router-peers"]
    return deploy["spec"]["template"]["spec"]["containers"][0], (peers[0] if peers else None), deploy


@pytest.mark.parametrize("policy", ["auto", "precise"])
def test_router_replicas_announce_decisions_through_a_headless_service(policy):
    """By default every router pod publishes its routing decisions on 5558 and subscribes to all
    router pods (itself included) through a headless Service that lists them before they are Ready."""
    body = copy.deepcopy(BASE)
    body["spec"]["router"] = {"policy": policy, "replicas": 3}
    container, peers, deploy = router_parts(body)
    args = container["args"]
    assert args[args.index("--peer-port"):args.index("--peer-port") + 4] == [
        "--peer-port", "5558", "--peers", "dns://chat-router-peers:5558"]
    assert {"name": "peers", "containerPort": 5558, "protocol": "TCP"} in container["ports"]
    assert peers is not None
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"] is True
    assert peers["spec"]["ports"] == [{"name": "peers", "port": 5558, "targetPort": "peers", "protocol": "TCP"}]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert peers["spec"]["selector"].items() <= pod_labels.items()
    assert peers["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    # Owned and labelled like every child (so prune deletes it once unwanted), but never scraped.
    assert peers["metadata"]["labels"][names.LABEL_SERVICE] == "chat"
    assert peers["metadata"]["ownerReferences"][0]["uid"] == BASE["metadata"]["uid"]
    assert names.LABEL_METRICS not in peers["metadata"]["labels"]
    for version in ("1.30.0", "1.34.0"):
        kubernetes_validate.validate(peers, version, strict=True)


def test_custom_peer_port_reaches_flag_port_and_service():
    body = copy.deepcopy(BASE)
    body["spec"]["router"] = {"peerPort": 7000}
    container, peers, _ = router_parts(body)
    args = container["args"]
    assert args[args.index("--peer-port") + 1] == "7000" and args[args.index("--peers") + 1] == "dns://chat-router-peers:7000"
    assert {"name": "peers", "containerPort": 7000, "protocol": "TCP"} in container["ports"]
    assert peers["spec"]["ports"][0]["port"] == 7000


@pytest.mark.parametrize("router", [{"peerPort": 0}, {"policy": "cache_aware"}, {"policy": "round_robin"}, {"kvEventsPort": 0}],
                         ids=["peerPort-0", "cache_aware", "round_robin", "kvEventsPort-0"])
def test_no_peers_without_precise_routing(router):
    """Announcements only serve the precise policy on KV events: otherwise no flag, port or Service."""
    body = copy.deepcopy(BASE)
    body["spec"]["router"] = router
    container, peers, _ = router_parts(body)
    assert "--peer-port" not in container["args"] and "--peers" not in container["args"]
    assert [p["name"] for p in container["ports"]] == ["http"]
    assert peers is None
    assert not any("peers" in m["metadata"]["name"] for m in children(body))


@pytest.mark.parametrize(("router", "message"), [
    ({"peerPort": 70000}, "router.peerPort must be between 0 and 65535, got 70000"),
    ({"peerPort": -1}, "router.peerPort must be between 0 and 65535, got -1"),
    ({"peerPort": "x"}, "router.peerPort must be an integer, got 'x'"),
    ({"peerPort": 30000}, "router.peerPort and router.port are both ports of the router pod"),
])
def test_bad_peer_port_is_a_spec_error(router, message):
    body = copy.deepcopy(BASE)
    body["spec"]["router"] = router
    with pytest.raises(SpecError, match=message):
        parse_spec(body)


def test_peer_port_equal_to_the_router_port_is_fine_when_peers_are_off():
    body = copy.deepcopy(BASE)
    body["spec"]["router"] = {"peerPort": 30000, "policy": "round_robin"}
    assert parse_spec(body).router.peer_port == 30000


def test_builders_are_deterministic():
    assert children(MULTI, True) == children(MULTI, True)
