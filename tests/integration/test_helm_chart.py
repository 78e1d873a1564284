"""The Helm chart: lints, installs (Helm v4 via helm-sdkpy, HELM_DRIVER=memory) into KMock
with default and non-default values, renders manifests that pass strict schema validation,
grants only what the operator uses, and its values.schema.json rejects bad values."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kube_harness import kube_emulator, router_process
from prometheus_harness import PROMETHEUS, query, scrape_configs, start_prometheus, wait_for_targets
from server_process import free_port

from radixfleet.operator.kube import KINDS
from radixfleet.operator.manifests.children import build_children
from radixfleet.operator.spec import parse_spec

helm = pytest.importorskip("helm_sdkpy", reason="helm-sdkpy is not installed (pip install --ignore-requires-python helm-sdkpy)")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "radixfleet"
BUILTIN_GROUPS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1"}
NON_DEFAULT = {
    "replicaCount": 2,
    "watchNamespaces": ["team-a", "team-b"],
    "image": {"repository": "registry.example.com/radixfleet", "tag": "1.2.3", "pullPolicy": "Always"},
    "operator": {"resyncSeconds": 10, "drainTimeoutSeconds": 30, "autoscaleIntervalSeconds": 5, "verbose": True,
                 "hubEndpoint": "https://hf-mirror.example.com"},
    "serviceMonitor": {"enabled": True, "interval": "5s", "labels": {"release": "kube-prometheus-stack"},
                       "apiKeySecret": {"name": "fleet-api-key"}},
    "dashboards": {"enabled": True, "namespace": "monitoring"},
    "nodeSelector": {"pool": "system"},
    "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
    "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
}

pytestmark = pytest.mark.timeout(120)


def kubeconfig(server: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "radixfleet"}}],
        "users": [{"name": "kmock", "user": {"token": "x"}}],
    })


# Helm (Go) reads HELM_DRIVER from the environment the process started with, so every
# Helm action runs in a child interpreter started with HELM_DRIVER=memory.
HELM_CHILD = """
import asyncio, json, sys
import helm_sdkpy as helm
args = json.load(sys.stdin)
async def main():
    config = helm.Configuration(namespace="radixfleet", kubeconfig=args["kubeconfig"])
    try:
        result = await helm.Install(config).run(args["release"], args["chart"], values=args["values"], wait=False, timeout=60)
    except helm.HelmError as e:
        print(json.dumps({"error": str(e)}))
        return
    print(json.dumps({"manifest": result.get("manifest", "")}))
asyncio.run(main())
"""


class HelmFailed(Exception):
    pass


async def install(values: dict | None, release: str = "rf") -> list[dict]:
    """helm install into a fresh KMock; returns the rendered manifest's documents."""
    async with kube_emulator() as (emulator, server):
        emulator["get /version"] << {"major": "1", "minor": "30", "gitVersion": "v1.30.0"}
        for plural, kind, namespaced in (("kopfpeerings", "KopfPeering", True), ("clusterkopfpeerings", "ClusterKopfPeering", False)):
            emulator.resources[f"kopf.dev/v1/{plural}"] = emulator.ResourceInfo(
                kind=kind, singular=kind.lower(), namespaced=namespaced, verbs={"get", "list", "watch", "create", "patch", "delete"})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HELM_CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "HELM_DRIVER": "memory"})
        args = {"kubeconfig": kubeconfig(server), "release": release, "chart": str(CHART), "values": values}
        out, _ = await asyncio.wait_for(proc.communicate(json.dumps(args).encode()), 90)
    result = json.loads(out.decode().strip().splitlines()[-1])
    if "error" in result:
        raise HelmFailed(result["error"])
    assert result["manifest"], "helm rendered an empty manifest"
    return [d for d in yaml.safe_load_all(result["manifest"]) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


async def test_chart_lints():
    """No lint errors or warnings (severity 2 warning, 3 error; 1 is info, e.g. 'icon is recommended')."""
    config = helm.Configuration(namespace="radixfleet")
    result = await helm.Lint(config).run(str(CHART))
    assert result["TotalChartsLinted"] == 1
    assert not result["Errors"], result
    assert all(m["Severity"] < 2 for m in result["Messages"]), result["Messages"]


@pytest.mark.parametrize("values", [None, NON_DEFAULT], ids=["default-values", "non-default-values"])
async def test_chart_renders_valid_manifests(values):
    docs = await install(values)
    for doc in docs:
        if doc["apiVersion"] in BUILTIN_GROUPS:
            for version in ("1.30.0", "1.34.0"):
                kubernetes_validate.validate(doc, version, strict=True)
    (deploy,) = by_kind(docs, "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["radixfleet"] and container["args"][0] == "operator"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    if values is None:
        assert "--standalone" in container["args"]
        assert not [a for a in container["args"] if a.startswith("--hub-endpoint")]
        assert container["image"] == "ghcr.io/radixfleet/radixfleet:0.1.0"
        assert {d["kind"] for d in docs} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"}
    else:
        assert deploy["spec"]["replicas"] == 2 and "--peering=radixfleet" in container["args"]
        assert {"--namespace=team-a", "--namespace=team-b", "--resync-seconds=10", "--verbose",
                "--hub-endpoint=https://hf-mirror.example.com"} <= set(container["args"])
        assert container["image"] == "registry.example.com/radixfleet:1.2.3"
        assert sorted(r["metadata"]["namespace"] for r in by_kind(docs, "Role")) == ["team-a", "team-b"]
        assert sorted(p["metadata"]["namespace"] for p in by_kind(docs, "KopfPeering")) == ["team-a", "team-b"]
        monitors = {m["metadata"]["name"]: m for m in by_kind(docs, "ServiceMonitor")}
        assert sorted(monitors) == ["rf-radixfleet-fleet", "rf-radixfleet-fleet-keyed"]
        for monitor in monitors.values():
            assert monitor["spec"]["selector"]["matchLabels"] == {"radixfleet.io/metrics": "true"}
            assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        # Keyed services (the operator labels them) are scraped only with the fleet's key.
        (plain,), (keyed,) = (monitors[n]["spec"]["endpoints"] for n in sorted(monitors))
        assert "authorization" not in plain
        assert keyed["authorization"] == {"type": "Bearer", "credentials": {"name": "fleet-api-key", "key": "api-key"}}
        assert [monitors[n]["spec"]["selector"]["matchExpressions"] for n in sorted(monitors)] == [
            [{"key": "radixfleet.io/metrics-auth", "operator": "DoesNotExist"}],
            [{"key": "radixfleet.io/metrics-auth", "operator": "Exists"}]]
        dashboards = by_kind(docs, "ConfigMap")
        assert len(dashboards) == 3
        for cm in dashboards:
            assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["metadata"]["namespace"] == "monitoring"
            ((name, text),) = cm["data"].items()
            assert json.loads(text) == json.loads((ROOT / "grafana" / name).read_text())


async def test_rbac_grants_exactly_what_the_operator_uses():
    docs = await install(None)
    rules = [r for role in by_kind(docs, "ClusterRole") for r in role["rules"]]
    granted = {(g, res): set(r["verbs"]) for r in rules for g in r["apiGroups"] for res in r["resources"]}
    for kind, info in KINDS.items():
        group = info.api_version.rpartition("/")[0]
        assert (group, info.plural) in granted, f"the operator manages {kind} but the chart grants nothing on it"
    assert granted[("", "secrets")] == {"get"}
    assert granted[("radixfleet.io", "inferenceservices/status")] == {"patch"}
    assert not any("*" in verbs or "update" in verbs for verbs in granted.values()), granted
    assert all(r["resources"] != ["*"] and r["apiGroups"] != ["*"] for r in rules)


def test_values_schema_accepts_defaults_and_rejects_bad_values():
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    jsonschema.Draft7Validator(schema).validate({**defaults, **NON_DEFAULT})
    bad = [
        ({"replicaCount": 0}, "0 is less than the minimum of 1"),
        ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "'Sometimes' is not one of"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "does not match"),
        ({"replicas": 2}, "Additional properties are not allowed ('replicas' was unexpected)"),
        ({"serviceMonitor": {"enabled": "yes"}}, "'yes' is not of type 'boolean'"),
        ({"operator": {"hubEndpoint": "hf-mirror.example.com"}}, "does not match"),
    ]
    for patch, message in bad:
        with pytest.raises(jsonschema.ValidationError) as err:
            jsonschema.Draft7Validator(schema).validate({**defaults, **patch})
        assert message in err.value.message


async def test_helm_itself_enforces_the_values_schema():
    with pytest.raises(HelmFailed) as err:
        await install({"replicaCount": 0})
    assert "replicaCount" in str(err.value) and "minimum" in str(err.value)


@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="needs the Debian package 'prometheus'")
async def test_fleet_monitors_scrape_keyed_services_only_with_the_key(tmp_path):
    """The chart's fleet ServiceMonitors, translated into a real Prometheus' scrape config: the
    plain one leaves a keyed InferenceService's Services alone (they would answer 401), the
    keyed one scrapes a live keyed router with the key from the Secret it names."""
    key = "fleet-test-key"
    values = {"serviceMonitor": {"enabled": True, "apiKeySecret": {"name": "fleet-api-key", "key": "token"}}}
    monitors = {m["metadata"]["name"]: m for m in by_kind(await install(values), "ServiceMonitor")}
    secrets = {"fleet-api-key": {"data": {"token": base64.b64encode(key.encode()).decode()}}}
    keyed = {"metadata": {"name": "chat", "namespace": "ml"}, "spec": {"model": {"path": "m"}, "apiKeySecret": {"name": "k"}}}
    plain = {"metadata": {"name": "plain", "namespace": "ml"}, "spec": {"model": {"path": "m"}}}
    services = [m for body in (keyed, plain) for m in build_children(parse_spec(body)) if m["kind"] == "Service"]
    everywhere = {s["metadata"]["name"]: "127.0.0.1:1" for s in services}
    selected = {name: [j["job_name"] for j in scrape_configs(m, services, secrets, everywhere, tmp_path)] for name, m in monitors.items()}
    assert selected == {"rf-radixfleet-fleet": ["plain-engine-0", "plain-router-0"],
                        "rf-radixfleet-fleet-keyed": ["chat-engine-0", "chat-router-0"]}

    router = router_process(free_port(), "127.0.0.1", str(tmp_path / "router.log"), "--api-key", key).start()
    prom = None
    try:
        router.wait(30)
        assert httpx.get(f"{router.url}/metrics", timeout=5, trust_env=False).status_code == 401
        jobs = scrape_configs(monitors["rf-radixfleet-fleet-keyed"], services, secrets,
                              {"chat-router": router.url.split("//")[1]}, tmp_path)
        prom = start_prometheus(jobs, tmp_path).wait(30)
        assert wait_for_targets(prom.url, jobs) == {"chat-router-0": "up"}
        assert query(prom.url, 'radixfleet_router_workers{radixfleet_io_service="chat", namespace="ml"}')
    finally:
        for proc in (router, prom):
            if proc is not None:
                proc.stop()
