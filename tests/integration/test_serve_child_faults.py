"""Issue #20 item 2b: the scheduler or the detokenizer killed inside a running ``radixfleet
serve``. Readiness fails at once, requests in flight and new ones fail fast with a 503 that
says why, and the server exits 1 so that Kubernetes restarts it. A real server process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import psutil
import pytest
from server_process import SERVER_ARGS, free_port, wait_ok

pytestmark = pytest.mark.timeout(120)
# Spawn order in Engine._start_serving_node: the detokenizer, then the scheduler.
ROLES = ("detokenizer", "scheduler")


def engine_child(server_pid: int, role: str) -> psutil.Process:
    children = [p for p in psutil.Process(server_pid).children()
                if "radixfleet.engine.managers.launch" in " ".join(p.cmdline())]
    assert len(children) == 2, children
    return sorted(children, key=lambda p: p.create_time())[ROLES.index(role)]


@pytest.mark.parametrize("role", ROLES)
def test_a_killed_engine_child_fails_requests_fast_and_the_server_exits_1(model_dir, role):
    """Regression: the server kept running with a dead scheduler or detokenizer (every request
    503, forever): nothing restarted it. Now a watchdog exits 1 once the requests failed."""
    port = free_port()
    cmd = [sys.executable, "-m", "radixfleet.engine.server.serve", "--model-path", model_dir, "--host", "127.0.0.1",
           "--port", str(port), *SERVER_ARGS]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    long = {"max_new_tokens": 500, "ignore_eos": True}
    answers: dict[str, object] = {}
    started = threading.Event()

    def streaming() -> None:
        body = {"text": "Tell me a long story.", "stream": True, "sampling_params": long}
        with httpx.stream("POST", url + "/generate", json=body, timeout=60, trust_env=False) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    started.set()
                    answers["stream_last"] = json.loads(line[len("data: "):])
        answers["stream_done"] = time.monotonic()

    def plain() -> None:
        resp = httpx.post(url + "/generate", json={"text": "Another long story.", "sampling_params": long},
                          timeout=60, trust_env=False)
        answers["plain"] = (resp.status_code, resp.json(), time.monotonic())

    try:
        wait_ok(url + "/health", 120, proc)
        clients = [threading.Thread(target=streaming), threading.Thread(target=plain)]
        for t in clients:
            t.start()
        assert started.wait(60), "the stream never started"
        engine_child(proc.pid, role).kill()
        killed = time.monotonic()

        while httpx.get(url + "/health", timeout=5, trust_env=False).status_code == 200:
            assert time.monotonic() - killed < 3, "/health still 200 three seconds after the kill"
            time.sleep(0.05)
        new = httpx.post(url + "/generate", json={"text": "hi"}, timeout=5, trust_env=False)
        assert new.status_code == 503 and "engine process has exited" in new.json()["error"]["message"]
        for t in clients:
            t.join(10)
        status, body, at = answers["plain"]
        assert status == 503 and f"the {role}" in body["error"]["message"], body
        assert at - killed < 5
        assert "died" in answers["stream_last"]["error"]["message"], answers["stream_last"]
        assert answers["stream_done"] - killed < 5
        assert proc.wait(15) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
