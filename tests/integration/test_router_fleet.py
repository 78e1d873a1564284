"""``radixfleet up`` with fake engines: prints the OpenAI URL, registers every worker through
the router, answers requests, and leaves no process behind after SIGTERM."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest
from router_harness import FAKE_WORKER, free_port

FAKE = f"{{python}} {shlex.quote(str(FAKE_WORKER))} --host {{host}} --port {{port}} --model-path {{model_path}}"


def start_fleet(port: int, workers: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "radixfleet", "up", "--workers", str(workers), "--port", str(port),
           "--worker-command", FAKE, "--shutdown-timeout", "5"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def engines_on(proc: subprocess.Popen, port: int) -> list[psutil.Process]:
    """The fleet's live processes serving ``port``; a child just killed (a zombie until
    ``radixfleet up`` reaps it) or gone meanwhile is not one."""
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if f"--port {port}" in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


def read_url_line(proc: subprocess.Popen, timeout: float = 40.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "OpenAI base URL" in line:
            return line
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"radixfleet up printed no URL (exit code {proc.poll()})")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_up_registers_workers_and_a_signal_leaves_no_process(sig):
    port = free_port()
    proc = start_fleet(port)
    try:
        line = read_url_line(proc)
        assert f"http://127.0.0.1:{port}/v1" in line
        urls = httpx.get(f"http://127.0.0.1:{port}/list_workers", trust_env=False).json()["urls"]
        assert len(urls) == 2
        base_url = line.split("OpenAI base URL: ", 1)[1].strip()
        answer = openai.OpenAI(base_url=base_url, api_key="unused").chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "hello"}])
        assert answer.choices[0].message.content.startswith("served by")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # the router and two workers
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [p.pid for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(60)
def test_up_stops_with_an_error_when_no_engine_starts():
    port = free_port()
    cmd = [sys.executable, "-m", "radixfleet", "up", "--workers", "1", "--port", str(port),
           "--worker-command", "{python} -c 'raise SystemExit(3)' {port}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 1
    assert "exited with code 3" in proc.stderr and "no engine became ready" in proc.stderr


@pytest.mark.timeout(90)
def test_up_starts_an_engine_that_died_again_and_registers_it():
    port = free_port()
    proc = start_fleet(port)
    try:
        read_url_line(proc)
        router = f"http://127.0.0.1:{port}"
        urls = httpx.get(router + "/list_workers", trust_env=False).json()["urls"]
        victim, = engines_on(proc, port + 1)
        victim.kill()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # removed from the router, started again, added back
            serving = [p for p in engines_on(proc, port + 1) if p.pid != victim.pid]
            listed = httpx.get(router + "/list_workers", trust_env=False).json()["urls"]
            if serving and sorted(listed) == sorted(urls):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"worker on port {port + 1} not back: listed {listed}, new process {serving}")
        answers = {httpx.post(router + "/generate", json={"text": chr(65 + i) * 40}, trust_env=False).json()["text"]
                   for i in range(8)}  # no shared prefix: spread by load
        assert f"served by worker-{port + 1}" in answers, answers  # the restarted worker serves again
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.timeout(60)
def test_up_gives_up_on_an_engine_after_its_restarts():
    port = free_port()
    cmd = [sys.executable, "-m", "radixfleet", "up", "--workers", "1", "--port", str(port), "--max-restarts", "2",
           "--worker-command", "{python} -c 'raise SystemExit(3)' {port}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 1
    assert proc.stderr.count("exited with code 3 before it was ready") == 3, proc.stderr
    assert "restart 2 of 2" in proc.stderr and "no restarts left" in proc.stderr
    assert "no engine became ready" in proc.stderr
