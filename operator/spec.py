"""The InferenceService spec as frozen dataclasses, parsed and validated once.

The CRD's openAPIV3Schema rejects most bad specs at admission; this parser repeats the
checks (and adds the cross-field ones) because the API server is not the only writer:
a spec that gets here invalid becomes a `SpecError`, which the handlers turn into a
`kopf.PermanentError` and a Failed phase. Defaults here equal the CRD's defaults
(tests/unit/test_crd.py checks that).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from radixfleet import env_vars
from radixfleet.engine.models.hub import REPO_ID_RE

MAX_NAME_LENGTH = 40  # leaves room for "-engine-<r>-<ordinal>" inside a 63-character label
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
ROUTER_POLICIES = ("auto", "precise", "cache_aware", "round_robin", "random", "power_of_two")
AUTOSCALING_METRICS = ("queuedRequests", "kvCacheUsage")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
GRACE_MARGIN_SECONDS = 10  # after the drain: the engine's own shutdown (processes, sockets)
HUB_TOKEN_KEY = "HF_TOKEN"  # the key in model.hub.tokenSecret's Secret, unless it names another
QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[eE][0-9]+)?$")
# What the operator owns in the pods it builds; user pod settings may not name these
# (tests/unit/test_operator_pod_settings.py checks the builders against these tables).
OPERATOR_PREFIX = "radixfleet.io/"
OPERATOR_LABELS = frozenset({
    "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by", "apps.kubernetes.io/pod-index",
})
OPERATOR_ANNOTATIONS = frozenset({"controller.kubernetes.io/pod-deletion-cost"})
OPERATOR_VOLUMES = {"dshm": "/dev/shm", "model": "/models", "model-cache": "/model-cache"}  # name -> mount path
OPERATOR_ENV = frozenset({env_vars.API_KEY.name, env_vars.NODE_RANK.name})
HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"  # set by the operator on engines serving a model.hub model


class SpecError(ValueError):
    """An InferenceService spec that cannot be served; the message says what to fix."""


@dataclass(frozen=True)
class SecretKey:
    name: str
    key: str


@dataclass(frozen=True)
class HubModel:
    """A Hugging Face Hub model, downloaded by an init container into a cache volume: a PVC
    or a node's hostPath shared by the pods (an emptyDir per pod without one)."""

    repo: str
    revision: str = "main"
    token_secret: SecretKey | None = None
    endpoint: str | None = None  # a Hub mirror (HF_ENDPOINT)
    cache_pvc_claim: str | None = None
    cache_host_path: str | None = None


@dataclass(frozen=True)
class ModelSource:
    path: str | None = None
    pvc_claim: str | None = None
    pvc_sub_path: str | None = None
    host_path: str | None = None
    hub: HubModel | None = None
    served_name: str | None = None


@dataclass(frozen=True)
class Resources:
    gpus: int = 0
    gpu_resource_name: str = "nvidia.com/gpu"
    cpu: str | None = None
    memory: str | None = None


@dataclass(frozen=True)
class PodSettings:
    """Where and as whom the operator's pods run (engine: top-level spec fields; router:
    spec.router's). Kubernetes objects (tolerations, affinity, security contexts) pass through
    as given; the API server validates them when the operator applies the workload."""

    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    priority_class_name: str | None = None
    image_pull_secrets: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    security_context: Mapping[str, Any] | None = None  # pod-level (PodSecurityContext)
    container_security_context: Mapping[str, Any] | None = None  # each container the operator builds
    service_account_name: str | None = None


@dataclass(frozen=True)
class RouterSpec:
    policy: str = "auto"
    # Engines publish their KV-cache events on this port and every router pod subscribes
    # (the precise policy, which auto picks once every engine publishes); 0: off.
    kv_events_port: int = 5557
    # Router replicas announce each routing decision to each other on this port (ZMQ PUB), so
    # one counts a request another sent a moment ago before the engine reports it; with
    # kv_events_port and a precise/auto policy only; 0: off.
    peer_port: int = 5558
    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.0001
    replicas: int = 1
    port: int = 30000
    service_type: str = "ClusterIP"
    pod: PodSettings = field(default_factory=PodSettings)

    @property
    def peers_enabled(self) -> bool:
        """Replicas announce decisions only under the policies that count them (precise, and auto,
        which becomes precise), and those need the engines' KV events."""
        return self.policy in ("auto", "precise") and self.kv_events_port > 0 and self.peer_port > 0


@dataclass(frozen=True)
class AutoscalingSpec:
    min_replicas: int
    max_replicas: int
    metric: str = "queuedRequests"
    target: float = 4.0
    scale_down_stabilization_seconds: int = 300
    external: bool = False


@dataclass(frozen=True)
class MonitoringSpec:
    service_monitor: bool = False
    interval: str = "15s"


@dataclass(frozen=True)
class DisruptionSpec:
    """How pods leave on a voluntary disruption (rollout, eviction, scale-down) without
    losing a request: engine pods keep serving `pre_stop_seconds` after their deletion (the
    routers and endpoints drop them meanwhile), then SIGTERM drains requests in flight for
    up to `drain_timeout_seconds`; a PodDisruptionBudget per component allows
    `max_unavailable` pods to be evicted at a time."""

    drain_timeout_seconds: int = 120
    pre_stop_seconds: int = 5
    max_unavailable: int = 1

    @property
    def termination_grace_seconds(self) -> int:
        """The pod's grace period: preStop, then the drain, then a margin to exit."""
        return self.pre_stop_seconds + self.drain_timeout_seconds + GRACE_MARGIN_SECONDS


@dataclass(frozen=True)
class ApiKeySecret:
    name: str
    key: str = "api-key"


@dataclass(frozen=True)
class InferenceServiceSpec:
    """One InferenceService: `name`/`namespace`/`uid` from metadata, the rest from spec."""

    name: str
    namespace: str
    uid: str
    model: ModelSource
    image: str = "ghcr.io/radixfleet/radixfleet:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    replicas: int = 1
    tensor_parallel_size: int = 1
    nodes_per_replica: int = 1
    port: int = 30000
    startup_timeout_seconds: int = 1800
    resources: Resources = field(default_factory=Resources)
    engine_args: tuple[str, ...] = ()
    env: tuple[Mapping[str, Any], ...] = ()
    env_from: tuple[Mapping[str, Any], ...] = ()
    volumes: tuple[Mapping[str, Any], ...] = ()  # the user's, beside the operator's
    volume_mounts: tuple[Mapping[str, Any], ...] = ()  # the user's, in the engine container
    shm_size: str | None = None  # sizeLimit of the memory-backed /dev/shm
    pod: PodSettings = field(default_factory=PodSettings)  # engine pods
    router: RouterSpec = field(default_factory=RouterSpec)
    autoscaling: AutoscalingSpec | None = None
    monitoring: MonitoringSpec = field(default_factory=MonitoringSpec)
    disruption: DisruptionSpec = field(default_factory=DisruptionSpec)
    api_key_secret: ApiKeySecret | None = None
    generation: int | None = None

    @property
    def multi_node(self) -> bool:
        return self.nodes_per_replica > 1

    @property
    def served_name(self) -> str:
        return self.model.served_name or self.name


def _int(value: Any, what: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{what} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise SpecError(f"{what} must be {bound}, got {value}")
    return value


def _choice(value: Any, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SpecError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _absolute(value: Any, what: str) -> Any:
    if value is not None and not str(value).startswith("/"):
        raise SpecError(f"{what} must be an absolute path, got {value!r}")
    return value


def _parse_model(raw: Any, hub_endpoint: str | None) -> ModelSource:
    if not isinstance(raw, Mapping):
        raise SpecError("spec.model is required: set model.path, model.pvc, model.hostPath or model.hub")
    pvc = raw.get("pvc")
    sources = [k for k in ("path", "pvc", "hostPath", "hub") if raw.get(k)]
    if len(sources) != 1:
        raise SpecError(f"set exactly one of model.path, model.pvc, model.hostPath, model.hub (got {sources or 'none'})")
    if pvc is not None and not (isinstance(pvc, Mapping) and pvc.get("claimName")):
        raise SpecError("model.pvc.claimName is required")
    if raw.get("cache") and not raw.get("hub"):
        raise SpecError("model.cache is where a model.hub download is kept: set model.hub with it, or drop it")
    return ModelSource(
        path=raw.get("path"),
        pvc_claim=pvc.get("claimName") if pvc else None,
        pvc_sub_path=pvc.get("subPath") if pvc else None,
        host_path=_absolute(raw.get("hostPath"), "model.hostPath"),
        hub=_parse_hub(raw["hub"], raw.get("cache") or {}, hub_endpoint) if raw.get("hub") else None,
        served_name=raw.get("servedName"),
    )


def _parse_hub(raw: Any, cache: Mapping[str, Any], default_endpoint: str | None) -> HubModel:
    if not isinstance(raw, Mapping):
        raise SpecError(f"model.hub must be an object with repo (org/name), got {raw!r}")
    repo = raw.get("repo")
    if not isinstance(repo, str) or not REPO_ID_RE.match(repo):
        raise SpecError(f"model.hub.repo must be a Hugging Face Hub repo id 'org/name', got {repo!r}")
    revision = raw.get("revision", "main")
    if not isinstance(revision, str) or not revision:
        raise SpecError(f"model.hub.revision must be a branch, tag or commit, got {revision!r}")
    secret = raw.get("tokenSecret")
    if secret is not None and not (isinstance(secret, Mapping) and secret.get("name")):
        raise SpecError("model.hub.tokenSecret.name is required (the Secret holding the Hub token)")
    endpoint = raw.get("endpoint") or default_endpoint
    if endpoint is not None and not str(endpoint).startswith(("http://", "https://")):
        raise SpecError(f"model.hub.endpoint must be an http(s) URL, got {endpoint!r}")
    kinds = [k for k in ("pvcClaim", "hostPath") if cache.get(k)]
    if len(kinds) > 1:
        raise SpecError(f"set one of model.cache.pvcClaim, model.cache.hostPath (got {kinds})")
    return HubModel(
        repo=repo,
        revision=revision,
        token_secret=SecretKey(secret["name"], secret.get("key", HUB_TOKEN_KEY)) if secret else None,
        endpoint=endpoint,
        cache_pvc_claim=cache.get("pvcClaim"),
        cache_host_path=_absolute(cache.get("hostPath"), "model.cache.hostPath"),
    )


def _objects(raw: Any, what: str) -> tuple[Mapping[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(x, Mapping) for x in raw):
        raise SpecError(f"{what} must be a list of objects, got {raw!r}")
    return tuple(raw)


def _object(raw: Any, what: str) -> Mapping[str, Any] | None:
    if raw is not None and not isinstance(raw, Mapping):
        raise SpecError(f"{what} must be an object, got {raw!r}")
    return raw or None


def _strings(raw: Any, what: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(v, str) for v in raw.values()):
        raise SpecError(f"{what} must map names to strings, got {raw!r}")
    return dict(raw)


def _operator_owned(key: str, reserved: frozenset[str]) -> bool:
    return key.startswith(OPERATOR_PREFIX) or key in reserved


def _parse_pod_settings(raw: Mapping[str, Any], where: str) -> PodSettings:
    """The pod settings under `where` ("spec" or "spec.router")."""
    labels = _strings(raw.get("podLabels"), f"{where}.podLabels")
    annotations = _strings(raw.get("podAnnotations"), f"{where}.podAnnotations")
    for what, keys, reserved in (("podLabels", labels, OPERATOR_LABELS), ("podAnnotations", annotations, OPERATOR_ANNOTATIONS)):
        if clash := sorted(k for k in keys if _operator_owned(k, reserved)):
            raise SpecError(f"{where}.{what}: {', '.join(clash)} set by the operator (keys under {OPERATOR_PREFIX} "
                            f"and {', '.join(sorted(reserved))} are reserved)")
    secrets = _objects(raw.get("imagePullSecrets"), f"{where}.imagePullSecrets")
    if not all(s.get("name") for s in secrets):
        raise SpecError(f"{where}.imagePullSecrets: every entry needs a name (of a docker-registry Secret)")
    account = raw.get("serviceAccountName")
    if account is not None and not (isinstance(account, str) and SUBDOMAIN_RE.match(account)):
        raise SpecError(f"{where}.serviceAccountName must be a ServiceAccount's name, got {account!r}")
    return PodSettings(
        node_selector=_strings(raw.get("nodeSelector"), f"{where}.nodeSelector"),
        tolerations=_objects(raw.get("tolerations"), f"{where}.tolerations"),
        affinity=_object(raw.get("affinity"), f"{where}.affinity"),
        priority_class_name=raw.get("priorityClassName") or None,
        image_pull_secrets=tuple(s["name"] for s in secrets),
        labels=labels,
        annotations=annotations,
        security_context=_object(raw.get("securityContext"), f"{where}.securityContext"),
        container_security_context=_object(raw.get("containerSecurityContext"), f"{where}.containerSecurityContext"),
        service_account_name=account,
    )


def _parse_env(raw: Any, hub: bool) -> tuple[Mapping[str, Any], ...]:
    env = _objects(raw, "spec.env")
    reserved = OPERATOR_ENV | ({HUB_OFFLINE_ENV} if hub else set())
    if clash := sorted({e.get("name") for e in env} & reserved):
        raise SpecError(f"spec.env: {', '.join(clash)} set by the operator (from apiKeySecret, the pod's rank "
                        f"or model.hub): drop it from spec.env")
    return env


def _parse_volumes(spec: Mapping[str, Any]) -> tuple[tuple[Mapping[str, Any], ...], tuple[Mapping[str, Any], ...]]:
    """spec.volumes and spec.volumeMounts: no operator volume name or mount path, and every
    mount names one of spec.volumes."""
    volumes = _objects(spec.get("volumes"), "spec.volumes")
    mounts = _objects(spec.get("volumeMounts"), "spec.volumeMounts")
    named = [v.get("name") for v in volumes]
    if clash := sorted(n for n in named if n in OPERATOR_VOLUMES):
        raise SpecError(f"spec.volumes: {', '.join(clash)} is a volume of the operator's "
                        f"({', '.join(OPERATOR_VOLUMES)} are reserved): rename it")
    if len(set(named)) != len(named) or not all(named):
        raise SpecError(f"spec.volumes: every volume needs a unique name, got {named}")
    for i, m in enumerate(mounts):
        if m.get("name") not in named:
            raise SpecError(f"spec.volumeMounts[{i}] mounts {m.get('name')!r}, which spec.volumes does not define")
        path = str(_absolute(m.get("mountPath") or "", f"spec.volumeMounts[{i}].mountPath")).rstrip("/")
        taken = [p for p in OPERATOR_VOLUMES.values() if path == p or path.startswith(p + "/") or p.startswith(path + "/")]
        if taken:
            raise SpecError(f"spec.volumeMounts[{i}].mountPath {path} overlaps the operator's mount at {taken[0]}")
    return volumes, mounts


def _parse_router(raw: Mapping[str, Any]) -> RouterSpec:
    d = RouterSpec()
    router = RouterSpec(
        policy=_choice(raw.get("policy", d.policy), "router.policy", ROUTER_POLICIES),
        kv_events_port=_int(raw.get("kvEventsPort", d.kv_events_port), "router.kvEventsPort", 0, 65535),
        peer_port=_int(raw.get("peerPort", d.peer_port), "router.peerPort", 0, 65535),
        cache_threshold=float(raw.get("cacheThreshold", d.cache_threshold)),
        balance_abs_threshold=_int(raw.get("balanceAbsThreshold", d.balance_abs_threshold), "router.balanceAbsThreshold", 0),
        balance_rel_threshold=float(raw.get("balanceRelThreshold", d.balance_rel_threshold)),
        replicas=_int(raw.get("replicas", d.replicas), "router.replicas", 1, 100),
        port=_int(raw.get("port", d.port), "router.port", 1, 65535),
        service_type=_choice(raw.get("serviceType", d.service_type), "router.serviceType", SERVICE_TYPES),
        pod=_parse_pod_settings(raw, "spec.router"),
    )
    if router.peers_enabled and router.peer_port == router.port:
        raise SpecError(f"router.peerPort and router.port are both ports of the router pod: they must differ, "
                        f"got {router.port} for both")
    return router


def _parse_disruption(raw: Mapping[str, Any]) -> DisruptionSpec:
    d = DisruptionSpec()
    return DisruptionSpec(
        drain_timeout_seconds=_int(raw.get("drainTimeoutSeconds", d.drain_timeout_seconds), "disruption.drainTimeoutSeconds", 0, 3600),
        pre_stop_seconds=_int(raw.get("preStopSeconds", d.pre_stop_seconds), "disruption.preStopSeconds", 0, 300),
        max_unavailable=_int(raw.get("maxUnavailable", d.max_unavailable), "disruption.maxUnavailable", 0),
    )


def _parse_autoscaling(raw: Mapping[str, Any] | None) -> AutoscalingSpec | None:
    if raw is None:
        return None
    lo = _int(raw.get("minReplicas"), "autoscaling.minReplicas", 0)
    hi = _int(raw.get("maxReplicas"), "autoscaling.maxReplicas", 1, 1000)
    if lo > hi:
        raise SpecError(f"autoscaling.minReplicas ({lo}) must not exceed maxReplicas ({hi})")
    target = float(raw.get("target", 4.0))
    if target <= 0:
        raise SpecError(f"autoscaling.target must be > 0, got {target}")
    return AutoscalingSpec(
        min_replicas=lo,
        max_replicas=hi,
        metric=_choice(raw.get("metric", "queuedRequests"), "autoscaling.metric", AUTOSCALING_METRICS),
        target=target,
        scale_down_stabilization_seconds=_int(raw.get("scaleDownStabilizationSeconds", 300), "autoscaling.scaleDownStabilizationSeconds", 0),
        external=bool(raw.get("external", False)),
    )


def parse_spec(body: Mapping[str, Any], hub_endpoint: str | None = None) -> InferenceServiceSpec:
    """Parse a whole InferenceService object (metadata + spec); raise `SpecError` if invalid.
    `hub_endpoint` is the operator's Hub mirror for specs that name none."""
    meta = body.get("metadata") or {}
    name = meta.get("name") or ""
    if not NAME_RE.match(name) or len(name) > MAX_NAME_LENGTH:
        raise SpecError(f"metadata.name must be a DNS label of at most {MAX_NAME_LENGTH} characters, got {name!r}")
    spec = body.get("spec") or {}
    d = InferenceServiceSpec(name=name, namespace="", uid="", model=ModelSource())
    tp = _int(spec.get("tensorParallelSize", d.tensor_parallel_size), "spec.tensorParallelSize", 1, 1024)
    nodes = _int(spec.get("nodesPerReplica", d.nodes_per_replica), "spec.nodesPerReplica", 1, 64)
    if tp % nodes:
        raise SpecError(f"spec.tensorParallelSize ({tp}) must be a multiple of nodesPerReplica ({nodes})")
    res = spec.get("resources") or {}
    api_key = spec.get("apiKeySecret")
    monitoring = spec.get("monitoring") or {}
    model = _parse_model(spec.get("model"), hub_endpoint)
    volumes, mounts = _parse_volumes(spec)
    shm = spec.get("shmSize")
    if shm is not None and not QUANTITY_RE.match(str(shm)):
        raise SpecError(f"spec.shmSize must be a quantity such as 16Gi, got {shm!r}")
    return InferenceServiceSpec(
        name=name,
        namespace=meta.get("namespace") or "default",
        uid=meta.get("uid") or "",
        generation=meta.get("generation"),
        model=model,
        image=spec.get("image", d.image),
        image_pull_policy=_choice(spec.get("imagePullPolicy", d.image_pull_policy), "spec.imagePullPolicy", ("Always", "IfNotPresent", "Never")),
        replicas=_int(spec.get("replicas", d.replicas), "spec.replicas", 0, 1000),
        tensor_parallel_size=tp,
        nodes_per_replica=nodes,
        port=_int(spec.get("port", d.port), "spec.port", 1, 65535),
        startup_timeout_seconds=_int(spec.get("startupTimeoutSeconds", d.startup_timeout_seconds), "spec.startupTimeoutSeconds", 30, 86400),
        resources=Resources(
            gpus=_int(res.get("gpus", 0), "resources.gpus", 0, 64),
            gpu_resource_name=res.get("gpuResourceName", "nvidia.com/gpu"),
            cpu=None if res.get("cpu") is None else str(res["cpu"]),
            memory=None if res.get("memory") is None else str(res["memory"]),
        ),
        engine_args=tuple(str(a) for a in spec.get("engineArgs") or ()),
        env=_parse_env(spec.get("env"), model.hub is not None),
        env_from=_objects(spec.get("envFrom"), "spec.envFrom"),
        volumes=volumes,
        volume_mounts=mounts,
        shm_size=None if shm is None else str(shm),
        pod=_parse_pod_settings(spec, "spec"),
        router=_parse_router(spec.get("router") or {}),
        autoscaling=_parse_autoscaling(spec.get("autoscaling")),
        monitoring=MonitoringSpec(
            service_monitor=bool(monitoring.get("serviceMonitor", False)),
            interval=monitoring.get("interval", "15s"),
        ),
        disruption=_parse_disruption(spec.get("disruption") or {}),
        api_key_secret=ApiKeySecret(api_key["name"], api_key.get("key", "api-key")) if api_key else None,
    )
