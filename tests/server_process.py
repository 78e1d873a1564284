"""Servers in subprocesses on free loopback ports: ``free_port``, ``wait_ok``, and a real
``radixfleet serve`` for the HTTP integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

SERVER_ARGS = ("--max-total-tokens", "8192", "--random-seed", "0")


def default_model_dir() -> str:
    from radixfleet.engine.models.model_prep import prepare_default_model

    return str(prepare_default_model())


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


@contextmanager
def engine_server(model_dir: str, *extra: str, timeout: float = 120.0,
                  headers: dict[str, str] | None = None) -> Iterator[str]:
    """Start the server, wait for ``/health``, yield its base URL; stop it on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "radixfleet.engine.server.serve", "--model-path", model_dir,
           "--host", "127.0.0.1", "--port", str(port), *SERVER_ARGS, *extra]
    with server_process(cmd, port, timeout=timeout, headers=headers) as url:
        yield url


@contextmanager
def server_process(cmd: list[str], port: int, timeout: float = 120.0, headers: dict[str, str] | None = None,
                   env: dict[str, str] | None = None, cwd: str | None = None) -> Iterator[str]:
    """Run ``cmd`` (a server on ``port``), wait until ``/health`` answers 200, yield its base
    URL; SIGTERM it on exit. Raises with the server's log if it exits first."""
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read()[-5000:]}")
            try:
                if httpx.get(url + "/health", timeout=2, headers=headers, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not answer /health within {timeout:.0f} s")
            time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
