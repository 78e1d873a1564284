"""Issue #20 item 4: API keys never reach the logs or error messages, and the router limits
request bodies as the engine does (regression: it read bodies of any size)."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import httpx
from router_harness import RouterThread, free_port, start_fake_workers
from server_process import SERVER_ARGS, default_model_dir, wait_ok

from radixfleet.router.config import RouterConfig

ENGINE_KEY, ROUTER_KEY = "engine-key-7f3a9c", "router-key-51d2e8"


def test_router_refuses_a_body_over_its_limit_with_413():
    workers = start_fake_workers(1)
    try:
        with RouterThread(RouterConfig(port=free_port(), worker_urls=(workers[0].url,), max_request_bytes=1000,
                                       worker_startup_timeout=5.0)) as r:
            big = {"text": "x" * 2000}
            by_length = httpx.post(r.url + "/generate", json=big, timeout=30)
            chunked = httpx.post(r.url + "/v1/completions", timeout=30,
                                 content=iter([b'{"prompt": "', b"x" * 2000, b'"}']))
            for resp in (by_length, chunked):
                assert resp.status_code == 413, resp.text
                assert "larger than 1000 bytes" in resp.json()["error"]["message"]
            assert httpx.post(r.url + "/flush_cache", content=b"x" * 2000, timeout=30).status_code == 413
            small = httpx.post(r.url + "/generate", json={"text": "hi"}, timeout=30)
            assert small.status_code == 200, small.text
    finally:
        workers[0].kill()


def test_api_keys_never_appear_in_logs_or_answers():
    """A keyed engine behind a keyed router, both at debug level: right and wrong keys, good and
    bad requests; neither key appears in anything either process writes or answers."""
    engine_port, router_port = free_port(), free_port()
    engine_url, router_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{router_port}"
    logs = tempfile.TemporaryFile(mode="w+")
    engine = subprocess.Popen([sys.executable, "-m", "radixfleet.engine.server.serve", "--model-path",
                               default_model_dir(), "--port", str(engine_port), *SERVER_ARGS,
                               "--api-key", ENGINE_KEY, "--log-level", "debug"], stdout=logs, stderr=subprocess.STDOUT)
    router = subprocess.Popen([sys.executable, "-m", "radixfleet", "router", "--port", str(router_port),
                               "--api-key", ROUTER_KEY, "--worker-api-key", ENGINE_KEY, "--log-level", "debug",
                               "--worker-urls", engine_url, "--worker-startup-timeout", "120"],
                              stdout=logs, stderr=subprocess.STDOUT)
    answers: list[str] = []
    try:
        wait_ok(engine_url + "/health", 120, engine)
        ok = {"Authorization": f"Bearer {ROUTER_KEY}"}
        for _ in range(600):
            if httpx.get(router_url + "/list_workers", headers=ok, timeout=5).json().get("urls"):
                break
            subprocess.run(["sleep", "0.2"])
        body = {"text": "Hi", "sampling_params": {"max_new_tokens": 2}}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ROUTER_KEY}, ok):
            for path, payload in (("/generate", body), ("/generate", {"text": 5}),
                                  ("/v1/chat/completions", {"messages": "x"}), ("/nope", body)):
                answers.append(httpx.post(router_url + path, json=payload, headers=headers, timeout=60).text)
        engine_ok = {"Authorization": f"Bearer {ENGINE_KEY}"}
        for headers in ({"Authorization": "Bearer wrong"}, engine_ok):
            answers.append(httpx.post(engine_url + "/generate", json=body, headers=headers, timeout=60).text)
            answers.append(httpx.get(engine_url + "/get_server_info", headers=headers, timeout=60).text)
        assert any('"text"' in a for a in answers)  # the right keys did get through
    finally:
        for proc in (router, engine):
            proc.terminate()
            proc.wait(30)
    logs.seek(0)
    written = logs.read()
    assert "DEBUG" in written or "INFO" in written, written[-2000:]
    for key in (ENGINE_KEY, ROUTER_KEY):
        assert key not in written, written[written.index(key) - 300:][:600]
        assert not [a for a in answers if key in a]
