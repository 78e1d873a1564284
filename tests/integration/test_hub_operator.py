"""An InferenceService naming a Hub model, through the real operator loop on KMock: its engine
pods (Deployment and multi-node StatefulSets) pass strict validation with their download init
container, and bad hub specs fail with a reason. Then the init container's command, as the
builder renders it, runs here as the kubelet would run it (two ranks at once on one cache
volume, then once more as after a restart) against a local Hub look-alike, and the engine
container's own flags find the downloaded snapshot offline."""

from __future__ import annotations

import copy
import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
from helpers import make_tiny_model
from hub_server import HubServer
from kube_harness import ISVC_PATH, NS, Api, eventually, kube_emulator, start_operator

from radixfleet.engine.config import EngineConfig
from radixfleet.engine.models.model_prep import resolve_model_path
from radixfleet.operator.manifests.children import build_children
from radixfleet.operator.manifests.model import MODEL_CACHE_MOUNT
from radixfleet.operator.spec import parse_spec

OPERATOR_CONFIG = dict(resync_seconds=1.5, drain_timeout_seconds=5, drain_poll_seconds=0.1, retry_delay_seconds=1,
                       autoscale_interval_seconds=3600)
MIRROR = "https://hf-mirror.example.com"
REPO = "org/tiny-llama"
TOKEN = "hf_tiny_token_0042"
SECRETS = {("hf", "token"): TOKEN}  # (Secret, key) -> value, as the kubelet would read it

pytestmark = pytest.mark.timeout(300)


def isvc(name: str, model: dict, **spec) -> dict:
    return {"apiVersion": "radixfleet.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}"},
            "spec": {"model": model, **spec}}


HUB_MODEL = {"hub": {"repo": REPO, "tokenSecret": {"name": "hf", "key": "token"}},
             "cache": {"hostPath": "/var/cache/radixfleet"}}
MULTI_NODE = dict(tensorParallelSize=2, nodesPerReplica=2, replicas=1)


def as_pod(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "engine-pod", "namespace": NS, "labels": template["metadata"]["labels"]},
            "spec": template["spec"]}


async def test_operator_renders_hub_model_pods_and_refuses_bad_hub_specs():
    async with kube_emulator() as (emulator, server):
        api = Api(server)
        operator = await start_operator(server, hub_endpoint=MIRROR, **OPERATOR_CONFIG)
        try:
            await api.create(ISVC_PATH, isvc("tiny", HUB_MODEL, replicas=2))
            await api.create(ISVC_PATH, isvc("big", {"hub": {"repo": REPO, "revision": "v2"}}, **MULTI_NODE))
            await api.create(ISVC_PATH, isvc("bad", {"hub": {"repo": "tiny-llama"}}))
            await api.create(ISVC_PATH, isvc("both", {"path": "smollm2", "hub": {"repo": REPO}}))
            deploy = await eventually(lambda: api.get(f"/apis/apps/v1/namespaces/{NS}/deployments/tiny-engine"),
                                      what="engine Deployment")
            sts = await eventually(lambda: api.get(f"/apis/apps/v1/namespaces/{NS}/statefulsets/big-engine-0"),
                                   what="rank StatefulSet")
            for workload, revision in ((deploy, "main"), (sts, "v2")):
                template = workload["spec"]["template"]
                for version in ("1.30.0", "1.34.0"):
                    kubernetes_validate.validate(workload, version, strict=True)
                    kubernetes_validate.validate(as_pod(template), version, strict=True)
                (init,) = template["spec"]["initContainers"]
                assert init["args"] == ["model", "download", REPO, "--revision", revision, "--cache-dir", MODEL_CACHE_MOUNT]
                assert {"name": "HF_ENDPOINT", "value": MIRROR} in init["env"]  # the operator's mirror
                engine_env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
                assert engine_env["HF_HUB_OFFLINE"] == "1"
            for name, message in (("bad", "model.hub.repo must be a Hugging Face Hub repo id 'org/name', got 'tiny-llama'"),
                                  ("both", "set exactly one of model.path, model.pvc, model.hostPath, model.hub")):
                status = await eventually(lambda n=name: _failed(api, n), what=f"{name} Failed")
                assert status["conditions"][0]["reason"] == "InvalidSpec" and message in status["conditions"][0]["message"]
                assert await api.get(f"/apis/apps/v1/namespaces/{NS}/deployments/{name}-engine") is None
        finally:
            await operator.stop()
            await api.close()


async def _failed(api: Api, name: str) -> dict | None:
    status = ((await api.get(f"{ISVC_PATH}/{name}")) or {}).get("status") or {}
    return status if status.get("phase") == "Failed" else None


def radixfleet() -> list[str]:
    """The containers' command, `radixfleet`, as installed here."""
    found = shutil.which("radixfleet")
    return [found] if found else [sys.executable, "-m", "radixfleet"]


def kubelet_env(container: dict, volume: Path, secrets: dict = SECRETS) -> dict[str, str]:
    """The container's environment: literal values and Secret keys (no other references here),
    on top of this process's environment without its HF_* variables."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    for e in container["env"]:
        if "value" in e:
            out[e["name"]] = e["value"].replace(MODEL_CACHE_MOUNT, str(volume))
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = secrets[ref["name"], ref["key"]]
    return out


def kubelet_args(container: dict, volume: Path) -> list[str]:
    """The container's args with its cache volume mounted at `volume` instead of /model-cache."""
    return [a.replace(MODEL_CACHE_MOUNT, str(volume)).replace("$(RADIXFLEET_NODE_RANK)", "1") for a in container["args"]]


def test_the_init_container_command_downloads_the_model_once_for_every_rank(tmp_path, monkeypatch):
    source = make_tiny_model("llama3", str(tmp_path / "tiny"))
    volume = tmp_path / "model-cache"  # what the hostPath volume holds for every rank of the node
    with HubServer() as hub:
        hub.add_repo(REPO, source, token=TOKEN, extra_files={"pytorch_model.bin": b"\0" * 256})
        spec = parse_spec(isvc("tiny", copy.deepcopy(HUB_MODEL), **MULTI_NODE), hub_endpoint=hub.url)
        template = next(m for m in build_children(spec) if m["kind"] == "StatefulSet")["spec"]["template"]
        (init,) = template["spec"]["initContainers"]
        (engine,) = template["spec"]["containers"]
        assert init["command"] == engine["command"] == ["radixfleet"]
        env = {**kubelet_env(init, volume), "HF_HOME": str(tmp_path / "hf-home")}
        argv = [*radixfleet(), *kubelet_args(init, volume)]

        # Both ranks of the group start their init containers at once on the shared volume; the
        # weights come slowly, so that the second asks for them while the first downloads.
        hub.stall("model.safetensors", 3.0)
        procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=180) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
        snapshot = Path(outs[0][0].strip().splitlines()[-1])
        assert outs[1][0].strip().splitlines()[-1] == str(snapshot)
        assert snapshot.is_relative_to(volume / "models--org--tiny-llama" / "snapshots")
        assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in Path(source).iterdir())
        for f in Path(source).iterdir():
            assert filecmp.cmp(snapshot / f.name, f, shallow=False), f.name
        assert len(hub.gets("model.safetensors")) == 1, "the ranks share one download"
        assert not hub.gets("pytorch_model.bin")

        # A restarted pod runs it again: it succeeds and fetches nothing again.
        fetched = len([r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path])
        again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip().splitlines()[-1] == str(snapshot)
        assert len([r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]) == fetched

        # The engine container's flags and env (HF_HUB_OFFLINE=1) find that snapshot without the Hub.
        serve = pytest.importorskip("radixfleet.engine.server.serve")
        for e in engine["env"]:
            if "value" in e:
                monkeypatch.setenv(e["name"], e["value"])
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: offline must not ask
        config = EngineConfig.from_cli_args(serve.build_parser().parse_args(kubelet_args(engine, volume)[1:]))
        asked = len(hub.requests)
        assert resolve_model_path(config.model_path, config.revision, config.download_dir) == str(snapshot)
        assert len(hub.requests) == asked


def test_a_wrong_token_in_the_secret_fails_the_init_container_with_a_reason(tmp_path):
    with HubServer() as hub:
        hub.add_repo(REPO, token=TOKEN, extra_files={"config.json": b"{}"})
        spec = parse_spec(isvc("tiny", copy.deepcopy(HUB_MODEL)), hub_endpoint=hub.url)
        deploy = next(m for m in build_children(spec) if m["kind"] == "Deployment")
        (init,) = deploy["spec"]["template"]["spec"]["initContainers"]
        env = {**kubelet_env(init, tmp_path / "cache", {("hf", "token"): "hf_revoked_token_9999"}),
               "HF_HOME": str(tmp_path / "hf-home")}
        proc = subprocess.run([*radixfleet(), *kubelet_args(init, tmp_path / "cache")],
                              env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1  # the pod shows Init:Error, and its log says why
    assert f"refused access to {REPO} (401) with the token in HF_TOKEN (hf_...9999)" in proc.stderr
    assert "Traceback" not in proc.stderr

