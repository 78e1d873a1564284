"""The InferenceService CRD: valid for the API server, structural, and it accepts the
examples and rejects bad specs with messages a user can act on."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from radixfleet.operator.manifests.children import build_children
from radixfleet.operator.spec import InferenceServiceSpec, SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "inferenceservice.yaml"
CHART_CRD_PATH = ROOT / "charts" / "radixfleet" / "crds" / "inferenceservice.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def load_crd() -> dict:
    return yaml.safe_load(CRD_PATH.read_text())


def schema() -> dict:
    return load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def isvc_examples() -> list[dict]:
    docs = [d for p in EXAMPLES for d in yaml.safe_load_all(p.read_text())]
    return [d for d in docs if d and d.get("kind") == "InferenceService"]


def validate(obj: dict) -> None:
    # OpenAPI v3.0 schemas use draft-4 keywords (boolean exclusiveMinimum).
    jsonschema.Draft4Validator(schema()).validate(obj)


@pytest.mark.parametrize("version", ["1.30.0", "1.34.0"])
def test_crd_is_a_valid_customresourcedefinition(version):
    kubernetes_validate.validate(load_crd(), version, strict=True)


def test_chart_ships_the_identical_crd():
    assert CHART_CRD_PATH.read_bytes() == CRD_PATH.read_bytes(), (
        "charts/radixfleet/crds/inferenceservice.yaml must equal crds/inferenceservice.yaml: "
        "cp crds/inferenceservice.yaml charts/radixfleet/crds/"
    )


def _walk(node: dict, path: str):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    """Every node has a type unless it is int-or-string or preserves unknown fields."""
    for path, node in _walk(schema(), "$"):
        exempt = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        assert "type" in node or exempt, f"{path} has no type (not a structural schema)"
        for forbidden in ("oneOf", "anyOf", "allOf", "not"):
            assert forbidden not in node or "type" not in str(node[forbidden]), f"{path}: {forbidden} with types"


def test_crd_has_status_and_scale_subresources_and_columns():
    version = load_crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert version["subresources"]["scale"]["labelSelectorPath"] == ".status.selector"
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:3] == ["Model", "Replicas", "Ready"] and "URL" in columns and "Age" in columns
    assert load_crd()["spec"]["names"]["shortNames"] == ["isvc"]


def test_examples_exist_and_validate():
    examples = isvc_examples()
    assert {e["metadata"]["name"] for e in examples} >= {"smollm2", "llama-70b", "qwen-7b"}
    for example in examples:
        validate(example)
        parse_spec(example)  # the operator accepts them too


def test_hub_example_names_a_hub_model():
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / "hub-model.yaml").read_text()) if d]
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    hub = parse_spec(isvc).model.hub
    assert hub is not None and hub.cache_pvc_claim == "hub-cache"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_objects_and_the_workloads_they_make_pass_strict_validation(path):
    """Every other object in the examples (Secrets, PVCs, the HPA), and every child the operator
    builds from each example's InferenceService."""
    for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
        objects = build_children(parse_spec(doc)) if doc["kind"] == "InferenceService" else [doc]
        for obj in objects:
            if obj["kind"] != "ServiceMonitor":
                for version in ("1.30.0", "1.34.0"):
                    kubernetes_validate.validate(obj, version, strict=True)


def test_keyed_examples_ship_the_secret_their_service_monitor_reads():
    """apiKeySecret with monitoring: the generated ServiceMonitor sends the key from the Secret
    the example defines, in the same namespace (as Prometheus requires)."""
    docs = [d for p in EXAMPLES for d in yaml.safe_load_all(p.read_text()) if d]
    secrets = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == "Secret"}
    keyed = [d for d in docs if d["kind"] == "InferenceService" and d["spec"].get("apiKeySecret")]
    assert keyed, "an example should show apiKeySecret"
    for isvc in keyed:
        (monitor,) = [m for m in build_children(parse_spec(isvc), with_service_monitor=True) if m["kind"] == "ServiceMonitor"]
        (endpoint,) = monitor["spec"]["endpoints"]
        ref = endpoint["authorization"]["credentials"]
        secret = secrets[(monitor["metadata"]["namespace"], ref["name"])]
        assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {})


def _bad(mutate) -> dict:
    obj = copy.deepcopy(next(e for e in isvc_examples() if e["metadata"]["name"] == "llama-70b"))
    mutate(obj["spec"])
    return obj


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda s: s.update(tensorParallelSize=0), "0 is less than the minimum of 1"),
        (lambda s: s.update(replicas=-1), "-1 is less than the minimum of 0"),
        (lambda s: s.pop("model"), "'model' is a required property"),
        (lambda s: s["router"].update(policy="fastest"), "'fastest' is not one of"),
        (lambda s: s["autoscaling"].pop("maxReplicas"), "'maxReplicas' is a required property"),
        (lambda s: s["resources"].update(memory="lots"), "does not match"),
        (lambda s: s["tolerations"][0].update(effect="Sometimes"), "'Sometimes' is not one of"),
        (lambda s: s["volumeMounts"][0].update(mountPath="scratch"), "does not match"),
        (lambda s: s["router"]["imagePullSecrets"].append({}), "'name' is a required property"),
        (lambda s: s.update(shmSize="big"), "does not match"),
        (lambda s: s["router"].update(peerPort=70000), "70000 is greater than the maximum of 65535"),
    ],
    ids=["tp-0", "replicas-negative", "missing-model", "unknown-policy", "autoscaling-no-max", "bad-memory",
         "bad-toleration-effect", "relative-mount", "pull-secret-no-name", "bad-shm-size",
         "peer-port-too-big"],
)
def test_bad_specs_are_rejected_by_the_schema(mutate, fragment):
    with pytest.raises(jsonschema.ValidationError) as err:
        validate(_bad(mutate))
    assert fragment in err.value.message


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda s: s.update(tensorParallelSize=0), "spec.tensorParallelSize must be between 1 and 1024, got 0"),
        (lambda s: s.update(replicas=-1), "spec.replicas must be between 0 and 1000, got -1"),
        (lambda s: s.pop("model"), "spec.model is required"),
        (lambda s: s.update(tensorParallelSize=3, nodesPerReplica=2), "must be a multiple of nodesPerReplica"),
        (lambda s: s["model"].update(hostPath="/data"), "set exactly one of model.path"),
        (lambda s: s["autoscaling"].update(minReplicas=5, maxReplicas=2), "must not exceed maxReplicas"),
        (lambda s: s["podLabels"].update({"radixfleet.io/service": "x"}), "radixfleet.io/service set by the operator"),
        (lambda s: s["volumes"].append({"name": "dshm", "emptyDir": {}}), "dshm is a volume of the operator's"),
        (lambda s: s["router"].update(peerPort=70000), "router.peerPort must be between 0 and 65535, got 70000"),
        (lambda s: s["router"].update(policy="auto", port=6000, peerPort=6000), "router.peerPort and router.port are both"),
    ],
)
def test_operator_rejects_bad_specs_with_messages(mutate, fragment):
    """The cross-field rules (CEL in the CRD) are enforced by the operator's parser too."""
    with pytest.raises(SpecError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(_bad(mutate))


def test_crd_defaults_equal_the_operators_defaults():
    props = schema()["properties"]["spec"]["properties"]
    parsed = parse_spec({"metadata": {"name": "x"}, "spec": {"model": {"path": "m"}}})
    assert isinstance(parsed, InferenceServiceSpec)
    top = {"image": parsed.image, "imagePullPolicy": parsed.image_pull_policy, "replicas": parsed.replicas,
           "tensorParallelSize": parsed.tensor_parallel_size, "nodesPerReplica": parsed.nodes_per_replica,
           "port": parsed.port, "startupTimeoutSeconds": parsed.startup_timeout_seconds}
    for key, value in top.items():
        assert props[key]["default"] == value, key
    router = props["router"]["properties"]
    r = parsed.router
    for key, value in {"policy": r.policy, "kvEventsPort": r.kv_events_port, "peerPort": r.peer_port, "cacheThreshold": r.cache_threshold, "balanceAbsThreshold": r.balance_abs_threshold,
                       "balanceRelThreshold": r.balance_rel_threshold, "replicas": r.replicas, "port": r.port,
                       "serviceType": r.service_type}.items():
        assert router[key]["default"] == value, f"router.{key}"
    (rule,) = props["router"]["x-kubernetes-validations"]
    assert rule["message"].startswith("router.peerPort and router.port are both")  # as the operator says
    disruption = props["disruption"]["properties"]
    d = parsed.disruption
    for key, value in {"drainTimeoutSeconds": d.drain_timeout_seconds, "preStopSeconds": d.pre_stop_seconds,
                       "maxUnavailable": d.max_unavailable}.items():
        assert disruption[key]["default"] == value, f"disruption.{key}"
