"""Helpers to run real routers and fake workers on loopback (tests and benchmarks).

Everything here starts real servers on free ports; nothing mocks HTTP.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import uvicorn

from .app import build_app
from .config import RouterConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ok(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200; raise if ``timeout`` passes or ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")


@dataclass
class FakeWorkerProcess:
    """``python -m radixfleet.router.fake_worker`` in a subprocess."""

    name: str
    latency: float = 0.0
    chunks: int = 4
    chunk_interval: float = 0.05
    api_key: str = ""
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeWorkerProcess:
        cmd = [sys.executable, "-m", "radixfleet.router.fake_worker", "--port", str(self.port), "--name", self.name,
               "--latency", str(self.latency), "--chunks", str(self.chunks), "--chunk-interval", str(self.chunk_interval), "--api-key", self.api_key]
        self.proc = subprocess.Popen(cmd)
        return self

    def wait(self, timeout: float = 30.0) -> FakeWorkerProcess:
        wait_ok(self.url + "/health", timeout, self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stats(self) -> dict:
        return httpx.get(self.url + "/_fake/stats", timeout=5, trust_env=False).json()


def start_fake_workers(n: int, **kwargs) -> list[FakeWorkerProcess]:
    """Start ``n`` fake workers in parallel and wait until all are healthy."""
    workers = [FakeWorkerProcess(f"w{i}", **kwargs).start() for i in range(n)]
    for w in workers:
        w.wait()
    return workers


class RouterThread:
    """The router app served by uvicorn in a background thread of this process."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.app = build_app(config)
        self.state = self.app.state.router
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=config.host, port=config.port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def __enter__(self) -> RouterThread:
        self.thread.start()
        wait_ok(self.url + "/health", 20.0)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
