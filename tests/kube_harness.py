"""Operator test helpers: KMock as the Kubernetes API, the real operator loop on it, real router
and engine processes on loopback addresses, and pods as the kubelet would report them.

KMock stores objects but runs no controllers: a test plays the Deployment/StatefulSet
controllers and the kubelet by creating pods and patching their Ready condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import kmock

from radixfleet.operator import names
from radixfleet.operator.config import OperatorConfig
from radixfleet.operator.handlers import build_registry
from radixfleet.operator.kube import USER_AGENT
from radixfleet.operator.runtime import Runtime

# The namespace the operator tests deploy into, and its InferenceService collection.
NS = "ml"
ISVC_PATH = f"/apis/radixfleet.io/v1alpha1/namespaces/{NS}/inferenceservices"

VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
ISVC_RESOURCE = f"{names.GROUP}/{names.VERSION}/{names.PLURAL}"


def engine_server_available() -> bool:
    return importlib.util.find_spec("radixfleet.engine.server.serve") is not None


@dataclass
class Proc:
    """A server subprocess that is healthy once `url + health` answers 200."""

    cmd: list[str]
    url: str
    health: str = "/health"
    proc: subprocess.Popen | None = None
    log_path: str | None = None

    def start(self) -> Proc:
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait(self, timeout: float = 60.0) -> Proc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd} exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                if httpx.get(self.url + self.health, timeout=1.0, trust_env=False).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.url}{self.health} not healthy within {timeout} s (log: {self.log_path})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def router_process(port: int, host: str = "127.0.0.1", log_path: str | None = None, *extra: str) -> Proc:
    cmd = [sys.executable, "-m", "radixfleet", "router", "--host", host, "--port", str(port),
           "--health-check-interval", "1", "--worker-startup-timeout", "20", "--log-level", "warning", *extra]
    return Proc(cmd, f"http://{host}:{port}", log_path=log_path)


def engine_process(host: str, port: int, model: str = "smollm2", log_path: str | None = None, *extra: str) -> Proc:
    """A real engine server (`radixfleet serve`) on `host:port`."""
    cmd = [sys.executable, "-m", "radixfleet.engine.server.serve", "--model-path", model, "--host", host, "--port", str(port), *extra]
    return Proc(cmd, f"http://{host}:{port}", log_path=log_path)


def declare_resources(emulator: kmock.KubernetesEmulator) -> None:
    """Built-ins plus the CRDs the operator uses (KMock does not read CRD objects)."""
    emulator.resources.load_bundled()
    emulator.resources[ISVC_RESOURCE] = kmock.ResourceInfo(
        kind=names.KIND, singular="inferenceservice", namespaced=True, verbs=VERBS,
        shortnames={"isvc"}, subresources={"status", "scale"},
    )
    emulator.resources["monitoring.coreos.com/v1/servicemonitors"] = kmock.ResourceInfo(
        kind="ServiceMonitor", singular="servicemonitor", namespaced=True, verbs=VERBS,
    )


# (apiGroup, resource[/subresource], verb) of every API call the operator made in this session,
# whichever test made it: tests/integration/test_operator_rbac.py compares them with the chart's RBAC.
OPERATOR_CALLS: set[tuple[str, str, str]] = set()
OPERATOR_AGENTS = ("kopf/", USER_AGENT)
_VERBS = {kmock.action.FETCH: "get", kmock.action.LIST: "list", kmock.action.WATCH: "watch",
          kmock.action.CREATE: "create", kmock.action.DELETE: "delete"}


def operator_call(request: Any) -> tuple[str, str, str] | None:
    """The RBAC triple of a request the operator (kopf or its own client) made; None for the
    tests' own calls, Helm's and non-resource URLs (discovery)."""
    if not request.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS) or not getattr(request.resource, "plural", None):
        return None
    if request.action == kmock.action.UPDATE:
        verb = "patch" if str(request.method).upper().endswith("PATCH") else "update"
    else:
        verb = _VERBS.get(request.action, str(request.action))
    resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
    return request.resource.group or "", resource, verb


class Emulator(kmock.KubernetesEmulator):
    """KMock with a little more of the API server's bookkeeping: `generateName` (kopf names
    its Events that way), `uid`/`creationTimestamp`/`generation` on create, `generation`
    bumped on spec changes, and the core group's discovery saying `groupVersion: v1` (KMock
    says "/v1", which client-go, hence Helm, cannot map).

    Every write also gives the object a new `resourceVersion`, and a JSON patch whose `test`
    of it fails is refused with 422, as the API server does. kopf relies on both: after its
    own patch it waits for the watch event carrying that version before it runs change
    handlers again, so it never re-handles the stale events queued before the patch. (With
    one version for ever, each of the operator's status writes queued an event that still
    showed the old last-handled spec, and kopf re-ran the update handler for it, again and
    again; on a loaded machine the later spec change waited behind that loop.)"""

    _counter: int = 0

    def _next(self) -> str:
        Emulator._counter += 1
        return str(Emulator._counter)

    async def _serve_version(self, request):  # type: ignore[no-untyped-def]
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and payload.get("groupVersion", "").startswith("/"):
            payload["groupVersion"] = payload["groupVersion"].lstrip("/")
        return payload

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        call = operator_call(request)
        if call is not None:
            OPERATOR_CALLS.add(call)
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict) and isinstance(data.get("metadata"), dict):
            meta = data["metadata"]
            if meta.get("generateName") and not meta.get("name"):
                meta["name"] = f"{meta['generateName']}{self._next()}"
            meta.setdefault("uid", f"uid-{meta.get('name')}-{self._next()}")
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            meta.setdefault("generation", 1)
            meta["resourceVersion"] = self._next()
        elif request.action == kmock.action.UPDATE and request.resource is not None:
            key = (request.resource, request.namespace, request.name)
            live = self.objects[key] if key in self.objects and not self.objects[key].deleted else None
            if isinstance(data, dict) and live is not None and request.subresource in (None, "scale") and "spec" in data:
                merged = {**dict(live.get("spec") or {}), **data["spec"]}
                if merged != dict(live.get("spec") or {}):
                    meta = data.setdefault("metadata", {})
                    meta["generation"] = int(dict(live.get("metadata") or {}).get("generation") or 1) + 1
            if live is not None:
                self._new_version(data, dict(live.get("metadata") or {}).get("resourceVersion"))
        return await super()._handle(request)

    def _new_version(self, patch: Any, current: str | None) -> None:
        """Give the patched object a new resourceVersion; refuse a JSON patch testing an old one."""
        if isinstance(patch, dict):
            patch.setdefault("metadata", {})["resourceVersion"] = self._next()
        elif isinstance(patch, list):
            for op in patch:
                if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" and op.get("value") != current:
                    raise kmock.KubernetesError(status=422, reason="Invalid", message=(
                        "the object has been modified: the JSON patch's resourceVersion test failed"))
            patch.append({"op": "replace", "path": "/metadata/resourceVersion", "value": self._next()})


@contextlib.asynccontextmanager
async def kube_emulator() -> AsyncIterator[tuple[kmock.KubernetesEmulator, str]]:
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        declare_resources(emulator)
        yield emulator, str(server.url).rstrip("/")


@dataclass
class RunningOperator:
    """The operator's kopf loop in a thread of its own (as in its own process: kopf's
    shutdown never waits on, or cancels, the test's tasks)."""

    runtime: Runtime
    thread: threading.Thread
    stop_flag: threading.Event = field(default_factory=threading.Event)

    async def stop(self) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 30)
        assert not self.thread.is_alive(), "the operator did not stop within 30 s"


async def start_operator(server: str, **config: Any) -> RunningOperator:
    """The real kopf loop with the operator's registry, pointed at `server`."""
    import kopf

    rt = Runtime(config=OperatorConfig(server=server, **config))
    stop, ready = threading.Event(), threading.Event()
    settings = kopf.OperatorSettings()
    # Quicker exits than production needs (per-object workers idle 5 s, then 2 s to drain).
    settings.batching.idle_timeout = 0.5
    settings.batching.exit_timeout = 0.5

    def run() -> None:
        asyncio.run(kopf.operator(
            registry=build_registry(rt), settings=settings, standalone=True, clusterwide=True,
            stop_flag=stop, ready_flag=ready,
        ))

    thread = threading.Thread(target=run, name="operator", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 30), "the operator did not start within 30 s"
    return RunningOperator(rt, thread, stop)


def pod_manifest(name: str, namespace: str, labels: dict[str, str], ip: str, *, ready: bool, created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    """A pod as the API reports it once scheduled: IP assigned, Ready or not."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "creationTimestamp": created, "uid": f"uid-{name}"},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def engine_labels(name: str, **extra: str) -> dict[str, str]:
    return {names.LABEL_SERVICE: name, names.LABEL_COMPONENT: names.ENGINE, names.LABEL_MANAGED_BY: names.MANAGED_BY, **extra}


def router_labels(name: str) -> dict[str, str]:
    return {names.LABEL_SERVICE: name, names.LABEL_COMPONENT: names.ROUTER, names.LABEL_MANAGED_BY: names.MANAGED_BY}


def list_workers(router_url: str) -> set[str]:
    return set(httpx.get(f"{router_url}/list_workers", timeout=5, trust_env=False).json()["urls"])


class Api:
    """Plain HTTP calls to the emulator, as kubectl would make them (events included)."""

    def __init__(self, server: str) -> None:
        self.client = httpx.AsyncClient(base_url=server, timeout=10)

    async def close(self) -> None:
        await self.client.aclose()

    async def create(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        resp = await self.client.post(path, json=obj)
        resp.raise_for_status()
        return resp.json()

    async def patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        resp = await self.client.patch(path, json=patch, headers={"Content-Type": "application/merge-patch+json"})
        resp.raise_for_status()
        return resp.json()

    async def delete(self, path: str) -> None:
        (await self.client.delete(path)).raise_for_status()

    async def get(self, path: str) -> dict[str, Any] | None:
        resp = await self.client.get(path)
        return None if resp.status_code == 404 else resp.json()

    async def set_ready(self, namespace: str, pod: str, ready: bool) -> None:
        cond = [{"type": "Ready", "status": "True" if ready else "False"}]
        await self.patch(f"/api/v1/namespaces/{namespace}/pods/{pod}", {"status": {"conditions": cond}})


async def eventually(check, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    """Await `check()` (sync or async) until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
