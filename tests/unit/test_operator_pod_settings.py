"""Pod settings (placement, identity, security, env, volumes, /dev/shm) from the spec to every
engine pod template (Deployment, each multi-node StatefulSet) and, for the fields that apply,
the router's; the operator's own labels, annotations, volumes and env are never overridden:
a spec that names them is refused with a SpecError saying which."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from radixfleet.operator import names
from radixfleet.operator.manifests.children import build_children
from radixfleet.operator.spec import (
    HUB_OFFLINE_ENV,
    OPERATOR_ANNOTATIONS,
    OPERATOR_ENV,
    OPERATOR_LABELS,
    OPERATOR_PREFIX,
    OPERATOR_VOLUMES,
    PodSettings,
    SpecError,
    parse_spec,
)

TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["zone-a"]}]}]}}}
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
PLACEMENT = {
    "nodeSelector": {"pool": "h100"},
    "tolerations": [TOLERATION],
    "affinity": AFFINITY,
    "priorityClassName": "inference-high",
    "imagePullSecrets": [{"name": "registry-creds"}],
    "podLabels": {"team": "search", "app.kubernetes.io/part-of": "assistant"},
    "podAnnotations": {"prometheus.io/scrape": "false", "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
    "securityContext": POD_SECURITY,
    "containerSecurityContext": CONTAINER_SECURITY,
    "serviceAccountName": "inference",
}
ENGINE_ONLY = {
    "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
    "envFrom": [{"configMapRef": {"name": "nccl-tuning"}}, {"secretRef": {"name": "proxy", "optional": True}, "prefix": "P_"}],
    "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "10Gi"}}, {"name": "ib", "hostPath": {"path": "/dev/infiniband"}}],
    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}, {"name": "ib", "mountPath": "/dev/infiniband"}],
    "shmSize": "32Gi",
}
ROUTER_PLACEMENT = {**PLACEMENT, "nodeSelector": {"pool": "cpu"}, "podLabels": {"team": "search"}, "priorityClassName": "inference-router"}


def body(**spec) -> dict:
    return {
        "apiVersion": "radixfleet.io/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": "ml", "uid": "uid-chat"},
        "spec": {"model": {"path": "smollm2"}, "replicas": 2, **spec},
    }


FULL_SINGLE = body(**PLACEMENT, **ENGINE_ONLY, router={"replicas": 2, **ROUTER_PLACEMENT})
FULL_MULTI = body(**PLACEMENT, **ENGINE_ONLY, tensorParallelSize=4, nodesPerReplica=2, apiKeySecret={"name": "key"},
                  model={"hub": {"repo": "org/model"}, "cache": {"pvcClaim": "hub-cache"}}, router=ROUTER_PLACEMENT)


def templates(obj: dict) -> dict[str, dict]:
    """Workload name -> pod template."""
    return {m["metadata"]["name"]: m["spec"]["template"] for m in build_children(parse_spec(copy.deepcopy(obj)))
            if m["kind"] in ("Deployment", "StatefulSet")}


def test_parser_reads_engine_and_router_settings():
    spec = parse_spec(FULL_SINGLE)
    assert spec.pod == PodSettings(
        node_selector={"pool": "h100"}, tolerations=(TOLERATION,), affinity=AFFINITY, priority_class_name="inference-high",
        image_pull_secrets=("registry-creds",), labels=PLACEMENT["podLabels"], annotations=PLACEMENT["podAnnotations"],
        security_context=POD_SECURITY, container_security_context=CONTAINER_SECURITY, service_account_name="inference")
    assert spec.router.pod.node_selector == {"pool": "cpu"} and spec.router.pod.priority_class_name == "inference-router"
    assert spec.shm_size == "32Gi" and [v["name"] for v in spec.volumes] == ["scratch", "ib"]
    assert parse_spec(body()).pod == PodSettings() and parse_spec(body()).router.pod == PodSettings()


@pytest.mark.parametrize("version", ["1.30.0", "1.34.0"])
@pytest.mark.parametrize("case", ["single", "multi"])
def test_rendered_pods_pass_strict_schema_validation(case, version):
    for m in build_children(parse_spec(copy.deepcopy(FULL_SINGLE if case == "single" else FULL_MULTI))):
        if m["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(m, version, strict=True)


@pytest.mark.parametrize("case", ["single", "multi"])
def test_every_engine_pod_and_the_router_carry_the_settings(case):
    obj = FULL_SINGLE if case == "single" else FULL_MULTI
    found = templates(obj)
    engines = [n for n in found if n != "chat-router"]
    assert engines == (["chat-engine"] if case == "single" else ["chat-engine-0", "chat-engine-1"])
    for name, template in found.items():
        pod, meta = template["spec"], template["metadata"]
        want = ROUTER_PLACEMENT if name == "chat-router" else PLACEMENT
        assert pod["nodeSelector"] == want["nodeSelector"] and pod["tolerations"] == [TOLERATION]
        assert pod["affinity"] == AFFINITY and pod["priorityClassName"] == want["priorityClassName"]
        assert pod["imagePullSecrets"] == [{"name": "registry-creds"}] and pod["serviceAccountName"] == "inference"
        assert pod["securityContext"] == POD_SECURITY
        containers = pod["containers"] + pod.get("initContainers", [])
        assert all(c["securityContext"] == CONTAINER_SECURITY for c in containers)
        assert want["podLabels"].items() <= meta["labels"].items()
        assert meta["annotations"] == PLACEMENT["podAnnotations"]
        component = names.ROUTER if name == "chat-router" else names.ENGINE
        assert names.labels(parse_spec(obj), component).items() <= meta["labels"].items()  # the operator's labels stay
    for name in engines:
        pod = found[name]["spec"]
        (engine,) = pod["containers"]
        assert engine["envFrom"] == ENGINE_ONLY["envFrom"]
        assert {"name": "NCCL_DEBUG", "value": "WARN"} in engine["env"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
        assert {"scratch", "ib"} <= volumes.keys()
        assert ENGINE_ONLY["volumeMounts"] == [m for m in engine["volumeMounts"] if m["name"] in ("scratch", "ib")]
        if case == "multi":  # the Hub download gets the user's environment sources too
            (download,) = pod["initContainers"]
            assert download["envFrom"] == ENGINE_ONLY["envFrom"]
    router = found["chat-router"]["spec"]
    assert "volumes" not in router and "envFrom" not in router["containers"][0]


def test_without_settings_nothing_is_added():
    for template in templates(body()).values():
        assert "annotations" not in template["metadata"]
        assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets",
                    "securityContext", "serviceAccountName"} & template["spec"].keys()
    dshm = next(v for v in templates(body())["chat-engine"]["spec"]["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory"}


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"podLabels": {"radixfleet.io/service": "other"}}, "spec.podLabels: radixfleet.io/service set by the operator"),
        ({"podLabels": {"app.kubernetes.io/component": "x"}}, "spec.podLabels: app.kubernetes.io/component set by the operator"),
        ({"router": {"podLabels": {"apps.kubernetes.io/pod-index": "0"}}}, "spec.router.podLabels: apps.kubernetes.io/pod-index set by"),
        ({"podAnnotations": {"radixfleet.io/draining": "true"}}, "spec.podAnnotations: radixfleet.io/draining set by the operator"),
        ({"podAnnotations": {"controller.kubernetes.io/pod-deletion-cost": "5"}}, "pod-deletion-cost set by the operator"),
        ({"volumes": [{"name": "dshm", "emptyDir": {}}]}, "spec.volumes: dshm is a volume of the operator's"),
        ({"volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]}, "every volume needs a unique name"),
        ({"volumes": [{"name": "a", "emptyDir": {}}], "volumeMounts": [{"name": "b", "mountPath": "/b"}]},
         "spec.volumeMounts[0] mounts 'b', which spec.volumes does not define"),
        ({"volumes": [{"name": "a", "emptyDir": {}}], "volumeMounts": [{"name": "a", "mountPath": "/dev/shm"}]},
         "spec.volumeMounts[0].mountPath /dev/shm overlaps the operator's mount at /dev/shm"),
        ({"volumes": [{"name": "a", "emptyDir": {}}], "volumeMounts": [{"name": "a", "mountPath": "/models/extra"}]},
         "overlaps the operator's mount at /models"),
        ({"env": [{"name": "RADIXFLEET_API_KEY", "value": "k"}]}, "spec.env: RADIXFLEET_API_KEY set by the operator"),
        ({"env": [{"name": HUB_OFFLINE_ENV, "value": "0"}], "model": {"hub": {"repo": "org/m"}}}, f"spec.env: {HUB_OFFLINE_ENV} set by"),
        ({"shmSize": "lots"}, "spec.shmSize must be a quantity"),
        ({"serviceAccountName": "Not_A_Name"}, "spec.serviceAccountName must be a ServiceAccount's name"),
        ({"imagePullSecrets": [{}]}, "spec.imagePullSecrets: every entry needs a name"),
        ({"router": {"tolerations": {"key": "x"}}}, "spec.router.tolerations must be a list of objects"),
        ({"affinity": ["x"]}, "spec.affinity must be an object"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_clashes_and_bad_values_are_refused_with_a_reason(spec, fragment):
    with pytest.raises(SpecError) as err:
        parse_spec(body(**spec))
    assert fragment in str(err.value)


def test_hub_offline_is_the_users_own_without_a_hub_model():
    parse_spec(body(env=[{"name": HUB_OFFLINE_ENV, "value": "1"}]))


@pytest.mark.parametrize("obj", [FULL_SINGLE, FULL_MULTI,
                                 body(model={"pvc": {"claimName": "m"}}), body(model={"hostPath": "/m"}, apiKeySecret={"name": "k"}),
                                 body(model={"hub": {"repo": "o/m"}, "cache": {"hostPath": "/c"}}, tensorParallelSize=2, nodesPerReplica=2)],
                         ids=["single", "multi", "pvc", "hostpath-keyed", "hub-multi"])
def test_the_reserved_tables_cover_what_the_builders_own(obj):
    """OPERATOR_* in spec.py (what the parser refuses) name every label, annotation, volume,
    mount and env variable the builders set themselves."""
    spec = parse_spec(copy.deepcopy(obj))
    user_volumes = {v["name"] for v in spec.volumes}
    user_env = {e["name"] for e in spec.env}
    for template in templates(obj).values():
        meta, pod = template["metadata"], template["spec"]
        own_labels = meta["labels"].keys() - spec.pod.labels.keys() - spec.router.pod.labels.keys()
        assert all(k.startswith(OPERATOR_PREFIX) or k in OPERATOR_LABELS for k in own_labels), own_labels
        assert not set(meta.get("annotations", {})) - set(spec.pod.annotations) - OPERATOR_ANNOTATIONS
        for volume in pod.get("volumes", []):
            assert volume["name"] in user_volumes or volume["name"] in OPERATOR_VOLUMES, volume
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in user_volumes:
                    assert OPERATOR_VOLUMES[mount["name"]] == mount["mountPath"], mount
            own_env = {e["name"] for e in container.get("env", [])} - user_env
            assert own_env <= OPERATOR_ENV | {HUB_OFFLINE_ENV}, own_env
