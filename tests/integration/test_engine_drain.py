"""``radixfleet serve`` on SIGTERM (a pod being deleted): readiness fails at once, new
requests get 503 with a reason, the request in flight finishes, and the process exits 0
within the drain timeout. A real server process, the default model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest
from server_process import SERVER_ARGS, free_port, wait_ok

from radixfleet.engine.server.drain import Drain, DrainMiddleware

pytestmark = pytest.mark.timeout(180)
DRAIN_TIMEOUT_S = 60
LONG_TOKENS = 400  # ~5-10 s on 2 CPU cores: still running when the checks below are done


@pytest.fixture
def server(model_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "radixfleet.engine.server.serve", "--model-path", model_dir, "--host", "127.0.0.1",
           "--port", str(port), "--drain-timeout", str(DRAIN_TIMEOUT_S), *SERVER_ARGS]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ok(url + "/health", 120, proc)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_sigterm_drains_requests_in_flight_then_exits_zero(server):
    proc, url = server
    answer: dict = {}
    first_chunk = threading.Event()

    def long_request() -> None:
        body = {"text": "Tell me a long story.", "stream": True,
                "sampling_params": {"max_new_tokens": LONG_TOKENS, "ignore_eos": True, "temperature": 0}}
        with httpx.stream("POST", url + "/generate", json=body, timeout=120, trust_env=False) as resp:
            answer["status"] = resp.status_code
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    first_chunk.set()
                    answer["last"] = json.loads(line[len("data: "):])
                elif line == "data: [DONE]":
                    answer["done"] = True

    client = threading.Thread(target=long_request)
    client.start()
    assert first_chunk.wait(60), "the long request never started streaming"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)

    ready = httpx.get(url + "/health", timeout=5, trust_env=False)
    assert ready.status_code == 503  # readiness: the endpoints and routers drop this server
    assert httpx.get(url + "/live", timeout=5, trust_env=False).status_code == 200  # liveness: not restarted
    refused = httpx.post(url + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}},
                         timeout=10, trust_env=False)
    assert refused.status_code == 503
    assert "shutting down" in refused.json()["error"]["message"]
    assert "done" not in answer, "the long request should still be running (make it longer)"

    client.join(DRAIN_TIMEOUT_S)
    assert answer.get("status") == 200 and answer.get("done"), answer
    assert answer["last"]["meta_info"]["completion_tokens"] == LONG_TOKENS
    assert proc.wait(DRAIN_TIMEOUT_S) == 0
    assert time.monotonic() - sent < DRAIN_TIMEOUT_S


def test_drain_gives_up_at_its_deadline():
    drain = Drain(timeout=0.2)
    assert not drain.draining and not drain.finished()
    drain.in_flight = 1
    drain.begin()
    assert drain.draining and not drain.finished()
    time.sleep(0.25)
    assert drain.finished()
    idle = Drain(timeout=60)
    idle.begin()
    assert idle.finished()  # nothing in flight: no need to wait


def test_liveness_fails_only_when_an_engine_process_exited():
    """/live must not fail while draining (the pod would be killed mid-drain), but must when the
    engine is dead (else the kubelet never restarts it); probes need no API key."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    drain, alive = Drain(timeout=60), [True]
    app = DrainMiddleware(Starlette(), drain, alive=lambda: alive[0])
    with TestClient(app) as client:
        assert client.get("/live").status_code == 200
        drain.begin()
        assert client.get("/live").status_code == 200
        assert client.get("/health").status_code == 503
        alive[0] = False
        dead = client.get("/live")
        assert dead.status_code == 503 and "engine process has exited" in dead.json()["error"]["message"]
