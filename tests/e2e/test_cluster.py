"""The operator scenario on a real cluster. Runs only when KUBECONFIG is set.

Prerequisites (see tests/e2e/README.md): the radixfleet image is pullable by the cluster
and the chart is installed (`helm install radixfleet charts/radixfleet -n radixfleet
--create-namespace --set image.repository=...`). The test then creates an InferenceService
on the default model and checks what a user sees: Ready status, registered workers, the
router answering, scale-down and self-repair, garbage collection on delete.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import yaml

from radixfleet import env_vars

pytestmark = [
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="KUBECONFIG is not set: no cluster to run the e2e scenario on"),
    pytest.mark.timeout(1800),
]

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "radixfleet.io", "v1alpha1", "inferenceservices"
IMAGE = env_vars.E2E_IMAGE.get()
TIMEOUT = env_vars.E2E_TIMEOUT.get()


@pytest.fixture(scope="module")
def k8s():
    kubernetes = pytest.importorskip("kubernetes")
    kubernetes.config.load_kube_config()
    return kubernetes.client


@pytest.fixture(scope="module")
def namespace(k8s):
    name = f"rf-e2e-{uuid.uuid4().hex[:6]}"
    k8s.CoreV1Api().create_namespace({"metadata": {"name": name}})
    yield name
    k8s.CoreV1Api().delete_namespace(name)


def wait(check, what: str, timeout: float = TIMEOUT, interval: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def router_get(k8s, namespace: str, path: str) -> str:
    return k8s.CoreV1Api().connect_get_namespaced_service_proxy_with_path("smollm2-router:http", namespace, path)


def test_inference_service_lifecycle(k8s, namespace):
    crds = k8s.ApiextensionsV1Api()
    assert crds.read_custom_resource_definition("inferenceservices.radixfleet.io"), "install the chart first"
    custom = k8s.CustomObjectsApi()
    isvc = yaml.safe_load((ROOT / "examples" / "single-node.yaml").read_text())
    isvc["metadata"]["namespace"] = namespace
    isvc["spec"]["image"] = IMAGE
    isvc["spec"].pop("autoscaling", None)
    isvc["spec"]["monitoring"] = {"serviceMonitor": False}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, isvc)

    def status():
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "smollm2").get("status") or {}

    ready = wait(lambda: status() if status().get("phase") == "Ready" else None, "phase Ready")
    assert ready["readyReplicas"] == 2 and len(ready["workers"]) == 2
    deploy = k8s.AppsV1Api().read_namespaced_deployment("smollm2-engine", namespace)
    assert deploy.metadata.owner_references[0].kind == "InferenceService"
    listed = router_get(k8s, namespace, "list_workers")  # the router's own view, through the API server proxy
    assert all(w in listed for w in ready["workers"]), listed

    # Scale down through the scale subresource (what `kubectl scale isvc/smollm2 --replicas=1` does).
    custom.patch_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, "smollm2", {"spec": {"replicas": 1}})
    wait(lambda: len(status().get("workers") or []) == 1 and status().get("readyReplicas") == 1, "scaled to 1 worker")

    # Kill the serving pod: the replacement registers, the dead one is gone from the router.
    pods = k8s.CoreV1Api().list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=engine").items
    live = [p for p in pods if not p.metadata.deletion_timestamp]
    k8s.CoreV1Api().delete_namespaced_pod(live[0].metadata.name, namespace)
    old_ip = live[0].status.pod_ip
    wait(lambda: status().get("phase") == "Ready" and all(old_ip not in w for w in status().get("workers") or []), "replacement registered")

    # Delete: owner references garbage-collect every child.
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "smollm2")
    wait(lambda: not k8s.AppsV1Api().list_namespaced_deployment(namespace).items, "children garbage-collected", timeout=300)
