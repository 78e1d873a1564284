"""Real routers and fake workers on loopback, for the router tests and
``benchmarks/router.py``. Everything here starts real servers on free ports; nothing mocks
HTTP."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from server_process import free_port, wait_ok

from radixfleet.router.app import build_app
from radixfleet.router.cli import KEEP_ALIVE_S
from radixfleet.router.config import RouterConfig

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


@dataclass
class FakeWorkerProcess:
    """``python tests/fake_worker.py`` in a subprocess."""

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
        cmd = [sys.executable, str(FAKE_WORKER), "--port", str(self.port), "--name", self.name,
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
                                                    log_level="warning", access_log=False,
                                                    timeout_keep_alive=KEEP_ALIVE_S))
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
