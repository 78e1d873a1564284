"""Names and labels of everything the operator creates for one InferenceService.

Every child carries `LABEL_SERVICE` (the owning InferenceService) and `LABEL_COMPONENT`;
the reconciler finds its children, and the worker sync finds engine pods, by these.
"""

from __future__ import annotations

from radixfleet.operator.spec import InferenceServiceSpec

GROUP = "radixfleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
PLURAL = "inferenceservices"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_SERVICE = f"{GROUP}/service"
LABEL_REPLICA = f"{GROUP}/replica"
LABEL_METRICS = f"{GROUP}/metrics"
# On metrics Services whose /metrics needs the service's API key (apiKeySecret): the chart's
# fleet-wide ServiceMonitor scrapes these only with a key it is given.
LABEL_METRICS_AUTH = f"{GROUP}/metrics-auth"
# Set by the StatefulSet controller on every pod (Kubernetes >= 1.28): the pod's ordinal.
LABEL_POD_INDEX = "apps.kubernetes.io/pod-index"
# Multi-node: the StatefulSet (group of ranks) a pod belongs to; a replica has one group, two
# while a rollout replaces it (`group_name`).
LABEL_GROUP = f"{GROUP}/group"
# On a group's StatefulSet: the hash of the pod template it was built from (stale: roll it),
# the pod uids of its ranks once all were Ready (one gone: restart the group), and why and
# when the operator last restarted the group.
ANNOTATION_TEMPLATE_HASH = f"{GROUP}/template-hash"
ANNOTATION_MEMBERS = f"{GROUP}/members"
ANNOTATION_RESTART_REASON = f"{GROUP}/restart-reason"
ANNOTATION_RESTARTED_AT = f"{GROUP}/restarted-at"
# Set by the operator on a Deployment pod it has chosen for scale-down (it is never re-registered).
ANNOTATION_DRAINING = f"{GROUP}/draining"
# Kubernetes' hint to the ReplicaSet controller about which pods to delete first.
ANNOTATION_DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"

MANAGED_BY = "radixfleet-operator"
ENGINE = "engine"
ROUTER = "router"
HTTP_PORT_NAME = "http"
DIST_PORT = 5000  # rank 0's torch.distributed rendezvous port in multi-node TP
KV_EVENTS_PORT_NAME = "kv-events"  # the engines' ZMQ PUB of KV-cache events (spec.router.kvEventsPort)
PEERS_PORT_NAME = "peers"  # the routers' ZMQ PUB of their routing decisions (spec.router.peerPort)


def selector_labels(spec: InferenceServiceSpec, component: str) -> dict[str, str]:
    """The labels a workload selects its pods by (immutable once created)."""
    return {LABEL_SERVICE: spec.name, LABEL_COMPONENT: component}


def labels(spec: InferenceServiceSpec, component: str) -> dict[str, str]:
    return {
        LABEL_NAME: "radixfleet",
        LABEL_INSTANCE: spec.name,
        LABEL_MANAGED_BY: MANAGED_BY,
        **selector_labels(spec, component),
    }


def metrics_labels(spec: InferenceServiceSpec) -> dict[str, str]:
    """Labels of a Service the ServiceMonitors scrape."""
    auth = {LABEL_METRICS_AUTH: "bearer"} if spec.api_key_secret is not None else {}
    return {LABEL_METRICS: "true", **auth}


def engine_name(spec: InferenceServiceSpec) -> str:
    """The engine Deployment (single-node) and the engine metrics Service."""
    return f"{spec.name}-engine"


def replica_name(spec: InferenceServiceSpec, replica: int) -> str:
    """The StatefulSet and headless Service of one multi-node replica."""
    return f"{spec.name}-engine-{replica}"


def group_name(spec: InferenceServiceSpec, replica: int, alternate: bool = False) -> str:
    """A multi-node replica's group (StatefulSet and headless Service); a rollout creates the
    other name of the pair, then retires the old. At most 52 characters (a StatefulSet's limit)."""
    return replica_name(spec, replica) + ("b" if alternate else "")


def router_name(spec: InferenceServiceSpec) -> str:
    return f"{spec.name}-router"


def router_peers_name(spec: InferenceServiceSpec) -> str:
    """The headless Service whose A records are the router pods, for their peer announcements
    (at most 53 characters: a name is at most MAX_NAME_LENGTH)."""
    return f"{spec.name}-router-peers"


def router_url(spec: InferenceServiceSpec) -> str:
    return f"http://{router_name(spec)}.{spec.namespace}.svc.cluster.local:{spec.router.port}"


def selector_string(spec: InferenceServiceSpec) -> str:
    """`status.selector` for the scale subresource: the serving engine pods."""
    sel = selector_labels(spec, ENGINE)
    return ",".join(f"{k}={v}" for k, v in sorted(sel.items()))
