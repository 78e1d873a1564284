"""Hub models in an InferenceService (`spec.model.hub`, `spec.model.cache`): the CRD and the
operator's parser accept them and reject bad ones with a message, and every engine pod (every
replica, every rank) gets a `radixfleet model download` init container writing to the cache
and an engine that reads it offline; the manifests pass strict schema validation."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from radixfleet.engine.models.model_prep import build_parser as model_cli
from radixfleet.operator.config import OperatorConfig
from radixfleet.operator.manifests.children import build_children
from radixfleet.operator.manifests.model import MODEL_CACHE_MOUNT
from radixfleet.operator.spec import HUB_TOKEN_KEY, SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[2]
CRD_SCHEMA = yaml.safe_load((ROOT / "crds" / "inferenceservice.yaml").read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
REPO = "Qwen/Qwen2.5-7B-Instruct"
SINGLE = {
    "apiVersion": "radixfleet.io/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "qwen", "namespace": "ml", "uid": "0b5a9f1e-1111-2222-3333-444455556666"},
    "spec": {"model": {"hub": {"repo": REPO, "revision": "v1.0", "tokenSecret": {"name": "hf"}},
                       "cache": {"pvcClaim": "hub-cache"}},
             "replicas": 2},
}
MULTI = copy.deepcopy(SINGLE)
MULTI["spec"].update(tensorParallelSize=4, nodesPerReplica=2, resources={"gpus": 2})
MULTI["spec"]["model"]["cache"] = {"hostPath": "/var/cache/radixfleet"}
NO_CACHE = copy.deepcopy(SINGLE)
del NO_CACHE["spec"]["model"]["cache"]
CASES = {"single-node-pvc": SINGLE, "multi-node-hostpath": MULTI, "no-cache-emptydir": NO_CACHE}


def with_model(**model) -> dict:
    body = copy.deepcopy(SINGLE)
    body["spec"]["model"] = model
    return body


def validate_crd(body: dict) -> None:
    jsonschema.Draft4Validator(CRD_SCHEMA).validate(body)  # OpenAPI v3.0 = draft-4 keywords


def pod_templates(body: dict, **parse_kwargs) -> list[dict]:
    children = build_children(parse_spec(copy.deepcopy(body), **parse_kwargs))
    return [m["spec"]["template"] for m in children if m["kind"] in ("Deployment", "StatefulSet")
            and m["metadata"]["labels"]["app.kubernetes.io/component"] == "engine"]


def containers(template: dict) -> tuple[dict, dict]:
    (init,) = template["spec"]["initContainers"]
    (engine,) = template["spec"]["containers"]
    return init, engine


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_hub_specs_pass_the_crd_and_parse_with_the_crd_defaults():
    for body in CASES.values():
        validate_crd(body)
    hub = parse_spec(with_model(hub={"repo": REPO, "tokenSecret": {"name": "hf"}})).model.hub
    props = CRD_SCHEMA["properties"]["spec"]["properties"]["model"]["properties"]["hub"]["properties"]
    assert hub.revision == props["revision"]["default"] == "main"
    assert hub.token_secret.key == props["tokenSecret"]["properties"]["key"]["default"] == HUB_TOKEN_KEY
    assert hub.cache_pvc_claim is None and hub.cache_host_path is None and hub.endpoint is None
    parsed = parse_spec(copy.deepcopy(MULTI)).model.hub
    assert (parsed.repo, parsed.revision, parsed.cache_host_path) == (REPO, "v1.0", "/var/cache/radixfleet")


@pytest.mark.parametrize(
    ("model", "schema_fragment"),
    [
        ({"hub": {"repo": "qwen-7b"}}, "does not match"),
        ({"hub": {"repo": "a/b/c"}}, "does not match"),
        ({"hub": {"revision": "main"}}, "'repo' is a required property"),
        ({"hub": {"repo": REPO, "revision": ""}}, "should be non-empty"),
        ({"hub": {"repo": REPO, "tokenSecret": {"key": "t"}}}, "'name' is a required property"),
        ({"hub": {"repo": REPO, "endpoint": "mirror.local"}}, "does not match"),
        ({"hub": {"repo": REPO}, "cache": {"hostPath": "cache"}}, "does not match"),
    ],
    ids=["repo-no-org", "repo-three-parts", "no-repo", "empty-revision", "secret-no-name", "endpoint-no-scheme",
         "cache-relative"],
)
def test_bad_hub_fields_are_rejected_by_the_crd(model, schema_fragment):
    with pytest.raises(jsonschema.ValidationError) as err:
        validate_crd(with_model(**model))
    assert schema_fragment in err.value.message


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"path": "smollm2", "hub": {"repo": REPO}},
         "set exactly one of model.path, model.pvc, model.hostPath, model.hub (got ['path', 'hub'])"),
        ({"hub": {"repo": "qwen-7b"}}, "model.hub.repo must be a Hugging Face Hub repo id 'org/name', got 'qwen-7b'"),
        ({"hub": {"repo": REPO, "revision": ""}}, "model.hub.revision must be a branch, tag or commit"),
        ({"hub": {"repo": REPO, "tokenSecret": {"key": "t"}}}, "model.hub.tokenSecret.name is required"),
        ({"hub": {"repo": REPO, "endpoint": "mirror.local"}}, "model.hub.endpoint must be an http(s) URL"),
        ({"path": "smollm2", "cache": {"pvcClaim": "c"}}, "model.cache is where a model.hub download is kept"),
        ({"hub": {"repo": REPO}, "cache": {"pvcClaim": "c", "hostPath": "/c"}},
         "set one of model.cache.pvcClaim, model.cache.hostPath"),
        ({"hub": {"repo": REPO}, "cache": {"hostPath": "cache"}}, "model.cache.hostPath must be an absolute path"),
    ],
    ids=["path-and-hub", "repo-no-org", "empty-revision", "secret-no-name", "endpoint-no-scheme", "cache-without-hub",
         "cache-two-kinds", "cache-relative"],
)
def test_bad_hub_specs_are_refused_by_the_operator_with_a_message(model, message):
    """The cross-field rules are CEL in the CRD (not evaluated here); the parser enforces all."""
    with pytest.raises(SpecError) as err:
        parse_spec(with_model(**model))
    assert message in str(err.value)


def test_the_crd_states_the_cross_field_rules():
    model = CRD_SCHEMA["properties"]["spec"]["properties"]["model"]
    rules = {r["message"]: r["rule"] for r in model["x-kubernetes-validations"]}
    assert "has(self.hub)" in rules["set exactly one of model.path, model.pvc, model.hostPath, model.hub"]
    assert any(m.startswith("model.cache is where") for m in rules)
    cache_rules = model["properties"]["cache"]["x-kubernetes-validations"]
    assert cache_rules[0]["message"] == "set one of model.cache.pvcClaim, model.cache.hostPath"


@pytest.mark.parametrize("version", ["1.30.0", "1.34.0"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_hub_model_manifests_pass_strict_schema_validation(case, version):
    for m in build_children(parse_spec(copy.deepcopy(CASES[case]))):
        kubernetes_validate.validate(m, version, strict=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_engine_pod_downloads_into_the_cache_and_serves_it_offline(case):
    templates = pod_templates(CASES[case])
    # One Deployment for both replicas, or one StatefulSet per replica (its pods are the ranks).
    assert len(templates) == (2 if case.startswith("multi") else 1)
    for template in templates:
        init, engine = containers(template)
        assert init["command"] == ["radixfleet"]
        assert init["args"] == ["model", "download", REPO, "--revision", "v1.0", "--cache-dir", MODEL_CACHE_MOUNT]
        assert init["image"] == engine["image"]
        assert env(init)["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}
        args = engine["args"]
        assert args[args.index("--model-path") + 1] == REPO
        assert args[args.index("--revision") + 1] == "v1.0"
        assert args[args.index("--download-dir") + 1] == MODEL_CACHE_MOUNT
        assert env(engine)["HF_HUB_OFFLINE"]["value"] == "1" and "HF_TOKEN" not in env(engine)
        (init_mount,) = init["volumeMounts"]
        engine_mount = next(m for m in engine["volumeMounts"] if m["name"] == init_mount["name"])
        assert init_mount["mountPath"] == engine_mount["mountPath"] == MODEL_CACHE_MOUNT
        assert engine_mount["readOnly"] and not init_mount.get("readOnly")
        (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == init_mount["name"]]
        expected = {"single-node-pvc": {"persistentVolumeClaim": {"claimName": "hub-cache"}},
                    "multi-node-hostpath": {"hostPath": {"path": "/var/cache/radixfleet", "type": "DirectoryOrCreate"}},
                    "no-cache-emptydir": {"emptyDir": {}}}[case]
        assert {k: v for k, v in volume.items() if k != "name"} == expected


def test_command_lines_parse_with_the_radixfleet_parsers():
    serve = pytest.importorskip("radixfleet.engine.server.serve")
    for template in pod_templates(MULTI):
        init, engine = containers(template)
        ns = model_cli().parse_args(init["args"][1:])
        assert (ns.action, ns.repo, ns.revision, ns.cache_dir) == ("download", REPO, "v1.0", MODEL_CACHE_MOUNT)
        args = [a.replace("$(RADIXFLEET_NODE_RANK)", "1") for a in engine["args"]]
        ns = serve.build_parser().parse_args(args[1:])
        assert (ns.model_path, ns.revision, ns.download_dir, ns.node_rank) == (REPO, "v1.0", MODEL_CACHE_MOUNT, 1)


def test_hub_endpoint_from_the_spec_the_operator_or_the_users_env():
    def endpoint(body, **kw):
        init, _ = containers(pod_templates(body, **kw)[0])
        values = [e["value"] for e in init["env"] if e["name"] == "HF_ENDPOINT"]
        assert len(values) <= 1, f"HF_ENDPOINT set twice: {init['env']}"
        return values[0] if values else None

    assert endpoint(SINGLE) is None  # huggingface_hub's default, huggingface.co
    assert endpoint(SINGLE, hub_endpoint="https://mirror.example.com") == "https://mirror.example.com"
    own = copy.deepcopy(SINGLE)
    own["spec"]["model"]["hub"]["endpoint"] = "https://hub.internal"
    assert endpoint(own, hub_endpoint="https://mirror.example.com") == "https://hub.internal"
    own["spec"]["env"] = [{"name": "HF_ENDPOINT", "value": "https://from-env"}]
    assert endpoint(own) == "https://from-env"
    with pytest.raises(ValueError, match="hub_endpoint must be an http"):
        OperatorConfig(hub_endpoint="mirror.example.com")


def test_other_model_sources_get_no_init_container():
    body = with_model(path="smollm2")
    (template,) = pod_templates(body)
    assert "initContainers" not in template["spec"]
    assert "HF_HUB_OFFLINE" not in env(template["spec"]["containers"][0])
