"""Where an engine pod finds its weights: the model volume, the engine's model flags and,
for a Hub model, the init container that downloads it.

A Hub model (`spec.model.hub`) is fetched by `radixfleet model download` (the same code as
`Engine(model_path="org/name")`) in an init container, into a cache volume mounted at
`/model-cache`: `spec.model.cache.pvcClaim` (a ReadWriteMany claim shared by every replica and
rank), `spec.model.cache.hostPath` (shared by the pods on one node), or an emptyDir per pod.
The download is idempotent (files already in the cache are not fetched again) and safe to run
in many pods at once (huggingface_hub locks each file and moves it into place whole). The
engine then resolves the same repo id from the cache with `HF_HUB_OFFLINE=1`, so it never
talks to the Hub and reads the volume read-only.
"""

from __future__ import annotations

from typing import Any

from radixfleet.operator.spec import HUB_OFFLINE_ENV, InferenceServiceSpec

MODEL_MOUNT = "/models"
MODEL_CACHE_MOUNT = "/model-cache"
DOWNLOAD_CONTAINER = "model-download"
HUB_TOKEN_ENV = "HF_TOKEN"
HUB_ENDPOINT_ENV = "HF_ENDPOINT"


def model_path(spec: InferenceServiceSpec) -> str:
    """The `--model-path` the engine sees inside the container."""
    if spec.model.hub is not None:
        return spec.model.hub.repo
    return spec.model.path or MODEL_MOUNT


def model_args(spec: InferenceServiceSpec) -> list[str]:
    """The engine's model flags."""
    args = ["--model-path", model_path(spec)]
    if spec.model.hub is not None:
        args += ["--revision", spec.model.hub.revision, "--download-dir", MODEL_CACHE_MOUNT]
    return args


def model_env(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    """The engine container's model variables: a Hub model comes from the cache alone."""
    return [{"name": HUB_OFFLINE_ENV, "value": "1"}] if spec.model.hub is not None else []


def model_volumes(spec: InferenceServiceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The model's volume and the engine's (read-only) mount of it, if it has one."""
    model, hub = spec.model, spec.model.hub
    if model.pvc_claim:
        mount = {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}
        if model.pvc_sub_path:
            mount["subPath"] = model.pvc_sub_path
        return [{"name": "model", "persistentVolumeClaim": {"claimName": model.pvc_claim, "readOnly": True}}], [mount]
    if model.host_path:
        return ([{"name": "model", "hostPath": {"path": model.host_path, "type": "Directory"}}],
                [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}])
    if hub is None:
        return [], []
    if hub.cache_pvc_claim:
        source: dict[str, Any] = {"persistentVolumeClaim": {"claimName": hub.cache_pvc_claim}}
    elif hub.cache_host_path:
        source = {"hostPath": {"path": hub.cache_host_path, "type": "DirectoryOrCreate"}}
    else:
        source = {"emptyDir": {}}
    return [{"name": "model-cache", **source}], [{"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT, "readOnly": True}]


def build_download_containers(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    """The init container that downloads a Hub model into the cache (none for other models)."""
    hub = spec.model.hub
    if hub is None:
        return []
    user_env = [dict(e) for e in spec.env]  # proxies, HF_* settings: the user's values win
    env: list[dict[str, Any]] = []
    if hub.token_secret is not None:
        env.append({"name": HUB_TOKEN_ENV, "valueFrom": {"secretKeyRef": {
            "name": hub.token_secret.name, "key": hub.token_secret.key}}})
    if hub.endpoint:
        env.append({"name": HUB_ENDPOINT_ENV, "value": hub.endpoint})
    overridden = {e["name"] for e in user_env}
    return [{
        "name": DOWNLOAD_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["radixfleet"],
        "args": ["model", "download", hub.repo, "--revision", hub.revision, "--cache-dir", MODEL_CACHE_MOUNT],
        "env": [e for e in env if e["name"] not in overridden] + user_env,
        **({"envFrom": [dict(e) for e in spec.env_from]} if spec.env_from else {}),
        "volumeMounts": [{"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT}],
    }]
