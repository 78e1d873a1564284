"""The user's pod settings (`PodSettings`: placement, identity, security) laid onto a pod
template the operator built, for engine and router pods alike.

The operator's labels and annotations are applied last, so they win; the parser has already
refused user keys that would collide with them (`SpecError`), so nothing is dropped silently.
"""

from __future__ import annotations

from typing import Any

from radixfleet.operator.spec import PodSettings


def build_pod_template(labels: dict[str, str], pod_spec: dict[str, Any], settings: PodSettings) -> dict[str, Any]:
    """A pod template: `pod_spec` (built by the operator) with `settings` added;
    `labels` are the operator's."""
    meta: dict[str, Any] = {"labels": {**settings.labels, **labels}}
    if settings.annotations:
        meta["annotations"] = dict(settings.annotations)
    spec = dict(pod_spec)
    if settings.node_selector:
        spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        spec["tolerations"] = [dict(t) for t in settings.tolerations]
    if settings.affinity:
        spec["affinity"] = dict(settings.affinity)
    if settings.priority_class_name:
        spec["priorityClassName"] = settings.priority_class_name
    if settings.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in settings.image_pull_secrets]
    if settings.service_account_name:
        spec["serviceAccountName"] = settings.service_account_name
    if settings.security_context:
        spec["securityContext"] = dict(settings.security_context)
    if settings.container_security_context:
        # Every container, init containers included: a restricted namespace checks them all.
        for key in ("initContainers", "containers"):
            if key in spec:
                spec[key] = [{**c, "securityContext": dict(settings.container_security_context)} for c in spec[key]]
    return {"metadata": meta, "spec": spec}
