"""Test helpers: KMock as the Kubernetes API, the real operator loop on it, real router
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
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import kmock
from radixfleet.operator import names
from radixfleet.operator.config import OperatorConfig
from radixfleet.operator.handlers import build_registry
from radixfleet.operator.runtime import Runtime

VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
ISVC_RESOURCE = f"{names.GROUP}/{names.VERSION}/{names.PLURAL}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_server_available() -> bool:
    return importlib.util.find_spec("radixfleet.engine.serve") is not None


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
    cmd = [sys.executable, "-m", "radixfleet.engine.serve", "--model-path", model, "--host", host, "--port", str(port), *extra]
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


class Emulator(kmock.KubernetesEmulator):
    """KMock plus `metadata.generateName` (kopf names its Events that way) and the core
    group's discovery answering `groupVersion: v1` (KMock says "/v1", which client-go,
    hence Helm, cannot map)."""

    _generated: int = 0

    async def _serve_version(self, request):  # type: ignore[no-untyped-def]
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and payload.get("groupVersion", "").startswith("/"):
            payload["groupVersion"] = payload["groupVersion"].lstrip("/")
        return payload

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        data = request.data if isinstance(request.data, dict) else None
        meta = (data or {}).get("metadata")
        if request.action == kmock.action.CREATE and isinstance(meta, dict) and meta.get("generateName") and not meta.get("name"):
            Emulator._generated += 1
            meta["name"] = f"{meta['generateName']}{Emulator._generated:05d}"
        return await super()._handle(request)


@contextlib.asynccontextmanager
async def kube_emulator() -> AsyncIterator[tuple[kmock.KubernetesEmulator, str]]:
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        declare_resources(emulator)
        yield emulator, str(server.url).rstrip("/")


@dataclass
class RunningOperator:
    runtime: Runtime
    task: asyncio.Task
    stop_flag: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self) -> None:
        self.stop_flag.set()
        await asyncio.wait_for(self.task, 30)


async def start_operator(server: str, **config: Any) -> RunningOperator:
    """The real kopf loop with the operator's registry, pointed at `server`."""
    import kopf

    rt = Runtime(config=OperatorConfig(server=server, **config))
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        registry=build_registry(rt), standalone=True, clusterwide=True, stop_flag=stop, ready_flag=ready,
    ))
    await asyncio.wait_for(ready.wait(), 30)
    return RunningOperator(rt, task, stop)


def pod_manifest(name: str, namespace: str, labels: dict[str, str], ip: str, *, ready: bool, created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    """A pod as the API reports it once scheduled: IP assigned, Ready or not."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "creationTimestamp": created, "uid": f"uid-{name}"},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


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
