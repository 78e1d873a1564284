"""A small async Kubernetes API client (httpx) for the objects the operator manages.

kopf watches and patches the InferenceService itself; this client does the rest
(children, pods, status, secrets) with the same credentials kopf logged in with.
A registry maps kinds to their API paths; nothing else is special-cased.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx


class KubeError(Exception):
    """A failed API call; `status` is the HTTP status (0 if the server was unreachable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status == 409 or self.status == 429 or self.status >= 500


@dataclass(frozen=True)
class Kind:
    api_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base


KINDS: dict[str, Kind] = {
    "Pod": Kind("v1", "pods"),
    "Service": Kind("v1", "services"),
    "Secret": Kind("v1", "secrets"),
    "Deployment": Kind("apps/v1", "deployments"),
    "StatefulSet": Kind("apps/v1", "statefulsets"),
    "PodDisruptionBudget": Kind("policy/v1", "poddisruptionbudgets"),
    "ServiceMonitor": Kind("monitoring.coreos.com/v1", "servicemonitors"),
    "InferenceService": Kind("radixfleet.io/v1alpha1", "inferenceservices"),
}


@dataclass(frozen=True)
class Credentials:
    """Where the API is and how to authenticate: built from kopf's `ConnectionInfo`."""

    server: str
    token: str | None = None
    ca_path: str | None = None
    ca_data: str | None = None  # base64 PEM, as in kubeconfig
    insecure: bool = False
    certificate_path: str | None = None
    private_key_path: str | None = None
    certificate_data: str | None = None
    private_key_data: str | None = None

    @classmethod
    def from_connection_info(cls, info: Any) -> Credentials:
        fields = ("token", "ca_path", "ca_data", "certificate_path", "private_key_path", "certificate_data", "private_key_data")
        values = {f: _text(getattr(info, f, None)) for f in fields}
        return cls(server=info.server, insecure=bool(info.insecure), **values)

    def verify(self) -> ssl.SSLContext | bool:
        if self.insecure:
            return False
        ctx = ssl.create_default_context(cafile=self.ca_path)
        if self.ca_data:
            ctx.load_verify_locations(cadata=base64.b64decode(self.ca_data).decode())
        cert, key = self.certificate_path, self.private_key_path
        if self.certificate_data and self.private_key_data:
            cert, key = _tempfile(self.certificate_data), _tempfile(self.private_key_data)
        if cert:
            ctx.load_cert_chain(cert, key)
        return ctx


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _tempfile(b64: str) -> str:
    fd, path = tempfile.mkstemp(prefix="radixfleet-kube-")
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(b64))
    return path


USER_AGENT = "radixfleet-operator"  # how the API server's audit log (and the RBAC test) tells our calls


def match_labels(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


class KubeApi:
    """get/list/create/patch/delete by kind name; `None` from `get` means not found."""

    def __init__(self, credentials: Credentials, timeout: float = 10.0) -> None:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if credentials.token:
            headers["Authorization"] = f"Bearer {credentials.token}"
        self._client = httpx.AsyncClient(base_url=credentials.server, headers=headers, verify=credentials.verify(), timeout=timeout)

    async def close(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any] | None:
        try:
            resp = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise KubeError(0, f"{method} {path}: {e!r}") from e
        if resp.status_code == 404 and method in ("GET", "DELETE"):
            return None
        if resp.status_code >= 400:
            raise KubeError(resp.status_code, f"{method} {path}: {resp.text[:500]}")
        return resp.json() if resp.content else {}

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return await self._request("GET", KINDS[kind].path(namespace, name))

    async def list(self, kind: str, namespace: str | None, selector: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in selector.items())} if selector else None
        result = await self._request("GET", KINDS[kind].path(namespace), params=params) or {}
        items = result.get("items") or []
        # Filter here too: a server that ignores labelSelector must not widen the result.
        return [i for i in items if not selector or match_labels(i, selector)]

    async def create(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        ns = manifest["metadata"].get("namespace")
        return await self._request("POST", KINDS[manifest["kind"]].path(ns), json=dict(manifest)) or {}

    async def patch(self, kind: str, namespace: str | None, name: str, patch: Mapping[str, Any], subresource: str | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"}
        path = KINDS[kind].path(namespace, name, subresource)
        return await self._request("PATCH", path, json=dict(patch), headers=headers) or {}

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        """Delete (dependents garbage-collected in the background); False if it was already gone."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        return await self._request("DELETE", KINDS[kind].path(namespace, name), json=body) is not None
