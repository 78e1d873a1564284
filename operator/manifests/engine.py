"""Engine manifests: a Deployment for single-node replicas; for multi-node tensor
parallelism one StatefulSet plus a headless Service per replica.

Multi-node: every pod of replica r runs `radixfleet serve --nnodes N --node-rank <ordinal>`
with rank 0 (`<sts>-0.<headless svc>`) as `--dist-init-addr`; only rank 0 serves HTTP
traffic, so only rank-0 pods are router workers. The ordinal comes from the
`apps.kubernetes.io/pod-index` label through the downward API.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from radixfleet import env_vars
from radixfleet.operator import names
from radixfleet.operator.manifests.model import (
    build_download_containers,
    model_args,
    model_env,
    model_volumes,
)
from radixfleet.operator.manifests.pod import build_pod_template
from radixfleet.operator.spec import InferenceServiceSpec

PROBE_PERIOD_SECONDS = 10
# The engine's probe routes (engine/server/drain.py): readiness fails while draining, liveness does not.
READINESS_PATH = "/health"
LIVENESS_PATH = "/live"
API_KEY_ENV = env_vars.API_KEY.name
POD_INDEX_ENV = env_vars.NODE_RANK.name


def engine_args(spec: InferenceServiceSpec, replica: int | None = None, group: str | None = None) -> list[str]:
    """The engine command line; `replica` (and its `group`) are set for multi-node replicas."""
    args = [
        "serve",
        *model_args(spec),
        "--host", "0.0.0.0",
        "--port", str(spec.port),
        "--tp-size", str(spec.tensor_parallel_size),
    ]
    # The name clients send (and status.model shows): servedName, else the resource's name.
    args += ["--served-model-name", spec.served_name]
    # SIGTERM (pod deletion, after the preStop sleep) drains requests in flight this long.
    args += ["--drain-timeout", str(spec.disruption.drain_timeout_seconds)]
    if spec.router.kv_events_port:  # every router pod subscribes (rank 0's scheduler publishes)
        args += ["--kv-events-port", str(spec.router.kv_events_port), "--kv-events-host", "0.0.0.0"]
    if replica is not None:
        group = group or names.group_name(spec, replica)
        rendezvous = f"{group}-0.{group}"
        args += [
            "--dist-init-addr", f"{rendezvous}.{spec.namespace}.svc:{names.DIST_PORT}",
            "--nnodes", str(spec.nodes_per_replica),
            "--node-rank", f"$({POD_INDEX_ENV})",
        ]
    # With apiKeySecret the engine reads its key from $RADIXFLEET_API_KEY (kept out of argv).
    return args + list(spec.engine_args)


def kv_events_ports(spec: InferenceServiceSpec, key: str) -> list[dict[str, Any]]:
    """The KV-event port entry of a container (``key`` "containerPort") or Service ("port")."""
    port = spec.router.kv_events_port
    if not port:
        return []
    entry: dict[str, Any] = {"name": names.KV_EVENTS_PORT_NAME, key: port, "protocol": "TCP"}
    if key == "port":
        entry["targetPort"] = names.KV_EVENTS_PORT_NAME
    return [entry]


def _env(spec: InferenceServiceSpec, multi_node: bool) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = model_env(spec)
    if multi_node:  # must precede the args that reference it
        env.append({
            "name": POD_INDEX_ENV,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{names.LABEL_POD_INDEX}']"}},
        })
    if spec.api_key_secret is not None:
        env.append({
            "name": API_KEY_ENV,
            "valueFrom": {"secretKeyRef": {"name": spec.api_key_secret.name, "key": spec.api_key_secret.key}},
        })
    return env + [dict(e) for e in spec.env]


def _resources(spec: InferenceServiceSpec) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if spec.resources.gpus:
        limits[spec.resources.gpu_resource_name] = spec.resources.gpus
    if spec.resources.cpu:
        requests["cpu"] = limits["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        requests["memory"] = limits["memory"] = spec.resources.memory
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _probe(spec: InferenceServiceSpec, multi_node: bool, period: int, failures: int, timeout: int = 5,
           path: str = READINESS_PATH) -> dict[str, Any]:
    """GET `path`; in a multi-node group only rank 0 serves HTTP, so the other ranks'
    probe passes while their container runs (a dead rank exits and is restarted)."""
    if multi_node:
        check = (f'[ "${POD_INDEX_ENV}" != 0 ] || exec python3 -c "import urllib.request as u; '
                 f"u.urlopen('http://127.0.0.1:{spec.port}{path}', timeout={timeout})\"")
        action: dict[str, Any] = {"exec": {"command": ["sh", "-c", check]}}
    else:
        action = {"httpGet": {"path": path, "port": names.HTTP_PORT_NAME}}
    return {**action, "periodSeconds": period, "timeoutSeconds": timeout, "failureThreshold": failures}


def _volumes(spec: InferenceServiceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # /dev/shm: torch and NCCL need more shared memory than a container's default 64 MiB
    # (shmSize caps it; the memory counts against the pod's memory limit).
    shm: dict[str, Any] = {"medium": "Memory", **({"sizeLimit": spec.shm_size} if spec.shm_size else {})}
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": shm}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    model_vols, model_mounts = model_volumes(spec)
    user_vols, user_mounts = [dict(v) for v in spec.volumes], [dict(m) for m in spec.volume_mounts]
    return volumes + model_vols + user_vols, mounts + model_mounts + user_mounts


def build_engine_pod_spec(spec: InferenceServiceSpec, replica: int | None = None, group: str | None = None) -> dict[str, Any]:
    """The pod spec shared by single-node and multi-node engine pods."""
    volumes, mounts = _volumes(spec)
    multi = replica is not None
    ports = [{"name": names.HTTP_PORT_NAME, "containerPort": spec.port, "protocol": "TCP"}]
    ports += kv_events_ports(spec, "containerPort")
    if replica is not None:
        ports.append({"name": "dist", "containerPort": names.DIST_PORT, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": "engine",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["radixfleet"],
        "args": engine_args(spec, replica, group),
        "ports": ports,
        "env": _env(spec, replica is not None),
        **({"envFrom": [dict(e) for e in spec.env_from]} if spec.env_from else {}),
        "resources": _resources(spec),
        "volumeMounts": mounts,
        # Model loading can take many minutes: the startup probe holds off the liveness
        # probe until /health first answers, for up to startupTimeoutSeconds.
        "startupProbe": _probe(spec, multi, PROBE_PERIOD_SECONDS, math.ceil(spec.startup_timeout_seconds / PROBE_PERIOD_SECONDS)),
        # /health fails as soon as a drain starts (SIGTERM); /live stays up until the process exits.
        "readinessProbe": _probe(spec, multi, 5, 3),
        "livenessProbe": _probe(spec, multi, 15, 4, path=LIVENESS_PATH),
    }
    if spec.disruption.pre_stop_seconds:
        # Keep serving while the routers and endpoints drop this pod; SIGTERM comes after.
        container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(spec.disruption.pre_stop_seconds)]}}}
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": spec.disruption.termination_grace_seconds,
    }
    # A Hub model's download runs before the engine starts (and outside its startup probe).
    if init := build_download_containers(spec):
        pod["initContainers"] = init
    return pod


def build_engine_deployment(spec: InferenceServiceSpec) -> dict[str, Any]:
    """Single-node replicas: one Deployment, one pod per replica."""
    selector = names.selector_labels(spec, names.ENGINE)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": names.engine_name(spec), "namespace": spec.namespace, "labels": names.labels(spec, names.ENGINE)},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector},
            # Never take a serving replica away before its replacement is Ready.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": build_pod_template(names.labels(spec, names.ENGINE), build_engine_pod_spec(spec), spec.pod),
        },
    }


def _replica_labels(spec: InferenceServiceSpec, replica: int, group: str) -> dict[str, str]:
    return {**names.labels(spec, names.ENGINE), names.LABEL_REPLICA: str(replica), names.LABEL_GROUP: group}


def _group_selector(spec: InferenceServiceSpec, replica: int, group: str) -> dict[str, str]:
    return {**names.selector_labels(spec, names.ENGINE), names.LABEL_REPLICA: str(replica), names.LABEL_GROUP: group}


def _statefulset_spec(spec: InferenceServiceSpec, replica: int, group: str) -> dict[str, Any]:
    return {
        "replicas": spec.nodes_per_replica,
        "serviceName": group,
        # All ranks must start together: rank 0 waits for the others at rendezvous.
        "podManagementPolicy": "Parallel",
        # A new template never restarts ranks one by one (that breaks the group): the
        # operator rolls whole groups instead (operator/groups.py).
        "updateStrategy": {"type": "OnDelete"},
        "selector": {"matchLabels": _group_selector(spec, replica, group)},
        "template": build_pod_template(_replica_labels(spec, replica, group), build_engine_pod_spec(spec, replica, group), spec.pod),
    }


def template_hash(spec: InferenceServiceSpec, replica: int) -> str:
    """What replica `replica`'s groups must be built from; the same for both group names."""
    canonical = _statefulset_spec(spec, replica, names.group_name(spec, replica))
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]


def build_replica_statefulset(spec: InferenceServiceSpec, replica: int, group: str | None = None) -> dict[str, Any]:
    """Multi-node replica `replica`: a StatefulSet of `nodesPerReplica` pods, rank = ordinal."""
    group = group or names.group_name(spec, replica)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": group, "namespace": spec.namespace, "labels": _replica_labels(spec, replica, group),
                     "annotations": {names.ANNOTATION_TEMPLATE_HASH: template_hash(spec, replica)}},
        "spec": _statefulset_spec(spec, replica, group),
    }


def build_replica_headless_service(spec: InferenceServiceSpec, replica: int, group: str | None = None) -> dict[str, Any]:
    """Stable DNS for the ranks of one multi-node group (rank 0 is the rendezvous)."""
    group = group or names.group_name(spec, replica)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": group, "namespace": spec.namespace, "labels": _replica_labels(spec, replica, group)},
        "spec": {
            "clusterIP": "None",
            # Ranks must resolve each other before they are Ready (they only become Ready together).
            "publishNotReadyAddresses": True,
            "selector": _group_selector(spec, replica, group),
            "ports": [
                {"name": names.HTTP_PORT_NAME, "port": spec.port, "targetPort": names.HTTP_PORT_NAME},
                {"name": "dist", "port": names.DIST_PORT, "targetPort": "dist"},
                *kv_events_ports(spec, "port"),
            ],
        },
    }


def build_engine_service(spec: InferenceServiceSpec) -> dict[str, Any]:
    """A headless Service over the serving (rank-0) engine pods: DNS and metrics scraping."""
    selector = names.selector_labels(spec, names.ENGINE)
    if spec.multi_node:
        selector[names.LABEL_POD_INDEX] = "0"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": names.engine_name(spec),
            "namespace": spec.namespace,
            "labels": {**names.labels(spec, names.ENGINE), **names.metrics_labels(spec)},
        },
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "ports": [{"name": names.HTTP_PORT_NAME, "port": spec.port, "targetPort": names.HTTP_PORT_NAME},
                      *kv_events_ports(spec, "port")],
        },
    }
