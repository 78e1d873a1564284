"""Router manifests: a Deployment running `radixfleet router`, the Service clients use, and
(spec.router.peers_enabled) a headless Service through which the router pods find each other.

The router starts with no workers; the operator registers each Ready engine replica
with `POST /add_worker` on every router pod (each router pod keeps its own list).
"""

from __future__ import annotations

from typing import Any

from radixfleet.operator import names
from radixfleet.operator.manifests.engine import API_KEY_ENV
from radixfleet.operator.manifests.pod import build_pod_template
from radixfleet.operator.spec import InferenceServiceSpec


def router_args(spec: InferenceServiceSpec) -> list[str]:
    r = spec.router
    args = [
        "router",
        "--host", "0.0.0.0",
        "--port", str(r.port),
        "--policy", r.policy,
        "--cache-threshold", str(r.cache_threshold),
        "--balance-abs-threshold", str(r.balance_abs_threshold),
        "--balance-rel-threshold", str(r.balance_rel_threshold),
    ]
    if spec.api_key_secret is not None:
        # Clients and the engines share the key: the router checks it and forwards it.
        args += ["--api-key", f"$({API_KEY_ENV})", "--worker-api-key", f"$({API_KEY_ENV})"]
    if r.peers_enabled:
        # Every router pod, itself included (it ignores its own announcements), by the short
        # name of the headless Service: it resolves in the pod's namespace.
        args += ["--peer-port", str(r.peer_port), "--peers", f"dns://{names.router_peers_name(spec)}:{r.peer_port}"]
    return args


def build_router_deployment(spec: InferenceServiceSpec) -> dict[str, Any]:
    ports = [{"name": names.HTTP_PORT_NAME, "containerPort": spec.router.port, "protocol": "TCP"}]
    if spec.router.peers_enabled:
        ports.append({"name": names.PEERS_PORT_NAME, "containerPort": spec.router.peer_port, "protocol": "TCP"})
    probe = {"httpGet": {"path": "/health", "port": names.HTTP_PORT_NAME}, "periodSeconds": 5, "timeoutSeconds": 3}
    container: dict[str, Any] = {
        "name": "router",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["radixfleet"],
        "args": router_args(spec),
        "ports": ports,
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "readinessProbe": {**probe, "failureThreshold": 3},
        "livenessProbe": {**probe, "failureThreshold": 6},
    }
    if spec.api_key_secret is not None:
        container["env"] = [{
            "name": API_KEY_ENV,
            "valueFrom": {"secretKeyRef": {"name": spec.api_key_secret.name, "key": spec.api_key_secret.key}},
        }]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": names.router_name(spec), "namespace": spec.namespace, "labels": names.labels(spec, names.ROUTER)},
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": names.selector_labels(spec, names.ROUTER)},
            "template": build_pod_template(names.labels(spec, names.ROUTER),
                                           {"containers": [container], "terminationGracePeriodSeconds": 30}, spec.router.pod),
        },
    }


def build_router_service(spec: InferenceServiceSpec) -> dict[str, Any]:
    """The InferenceService's endpoint (`status.url`): OpenAI-compatible and native routes."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": names.router_name(spec),
            "namespace": spec.namespace,
            "labels": {**names.labels(spec, names.ROUTER), **names.metrics_labels(spec)},
        },
        "spec": {
            "type": spec.router.service_type,
            "selector": names.selector_labels(spec, names.ROUTER),
            "ports": [{"name": names.HTTP_PORT_NAME, "port": spec.router.port, "targetPort": names.HTTP_PORT_NAME, "protocol": "TCP"}],
        },
    }


def build_router_peers_service(spec: InferenceServiceSpec) -> dict[str, Any] | None:
    """Headless: its A records are the router pods themselves, which each subscribe to every
    one (`--peers dns://...`). Not-ready pods are listed too, so that a starting replica hears
    and is heard at once. No metrics labels: there is nothing to scrape. None when peers are off."""
    if not spec.router.peers_enabled:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": names.router_peers_name(spec), "namespace": spec.namespace, "labels": names.labels(spec, names.ROUTER)},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": names.selector_labels(spec, names.ROUTER),
            "ports": [{"name": names.PEERS_PORT_NAME, "port": spec.router.peer_port, "targetPort": names.PEERS_PORT_NAME,
                       "protocol": "TCP"}],
        },
    }
