"""Every dashboard query, evaluated by a real Prometheus scraping a live engine and a live
router after real traffic: each must parse and return data.

Traffic is shaped so that every panel has something to show: a request before any worker
exists (rejected, 503), chat requests sharing a prefix (cache-aware hits, radix-cache hits),
streaming (inter-token latency), and a second router registered as a worker that answers
503 (worker failures, retries, its removal). Prometheus adds the `namespace` and
`radixfleet_io_service` labels a ServiceMonitor would.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from kube_harness import (
    Proc,
    engine_process,
    engine_server_available,
    router_process,
)
from server_process import free_port

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("engine", "router", "fleet")
NAMESPACE, SERVICE = "ml", "chat"

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not engine_server_available(), reason="radixfleet.engine.server.serve cannot be imported yet (engine server not built)"),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus (Debian package) is not installed"),
]


def prometheus_config(targets: dict[str, str]) -> dict:
    labels = {"namespace": NAMESPACE, "radixfleet_io_service": SERVICE}
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [addr], "labels": labels}]} for job, addr in targets.items()
        ],
    }


@pytest.fixture(scope="module")
def stack():
    """engine + router + failing peer router + Prometheus; yields their URLs."""
    tmp = Path(tempfile.mkdtemp(prefix="rf-dashboards-"))
    engine = engine_process("127.0.0.1", free_port(), log_path=str(tmp / "engine.log")).start()
    # The failing peer must stay registered until the test removes it through the API (the
    # worker_removals_total{reason="api"} panel); without a high limit its 503s could get it
    # evicted first, depending on where cache_aware sends the traffic.
    router = router_process(free_port(), "127.0.0.1", str(tmp / "router.log"),
                            "--max-worker-retries", "1000").start()
    broken = router_process(free_port(), log_path=str(tmp / "broken.log")).start()  # no workers: answers 503
    prom_port = free_port()
    config = prometheus_config({"engine": engine.url.split("//")[1], "router": router.url.split("//")[1]})
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = Proc(["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                f"http://127.0.0.1:{prom_port}", health="/-/ready", log_path=str(tmp / "prometheus.log")).start()
    procs = [engine, router, broken, prom]
    try:
        for p in (router, broken, prom):
            p.wait(30)
        engine.wait(180)
        yield {"engine": engine.url, "router": router.url, "broken": broken.url, "prometheus": prom.url}
    finally:
        for p in procs:
            p.stop()


def _chat(client: httpx.Client, router: str, body: dict, stream: bool) -> None:
    if not stream:
        resp = client.post(f"{router}/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        return
    with client.stream("POST", f"{router}/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        for _ in resp.iter_lines():
            pass


def drive_traffic(urls: dict[str, str]) -> None:
    router = urls["router"]
    with httpx.Client(timeout=120, trust_env=False) as c, ThreadPoolExecutor(4) as pool:
        # No workers yet: the router rejects (503, rejected_requests_total{reason="no_workers"}).
        assert c.post(f"{router}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}).status_code == 503
        for url in (urls["engine"], urls["broken"]):
            assert c.post(f"{router}/add_worker", params={"url": url}).status_code == 200
        # Unrelated prompts: cache_aware sends them to the smallest tree, i.e. the failing peer,
        # which answers 503; the router retries on the engine (worker_failures_total, retries_total).
        for text in ("Zebras run", "Quantum foam is"):
            resp = c.post(f"{router}/generate", json={"text": text, "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
            assert resp.status_code == 200, resp.text
        # Two waves of concurrent chats sharing a long system prompt (cache-aware and radix-cache
        # hits; the engine batches them), one streamed per wave (inter-token latency).
        system = "You are a concise assistant. Answer in one short sentence. " * 4
        for wave in range(2):
            bodies = [{"model": "smollm2", "max_tokens": 4, "temperature": 0,
                       "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Question {wave}-{i}: name a colour."}]}
                      for i in range(3)]
            list(pool.map(lambda ib: _chat(c, router, ib[1], stream=ib[0] == 1), enumerate(bodies)))
            time.sleep(2.5)  # let Prometheus scrape between waves so rates are non-zero
        # What the operator does on scale-down (worker_removals_total{reason="api"}).
        assert c.post(f"{router}/remove_worker", params={"url": urls["broken"]}).status_code == 200


def query(prom: str, expr: str) -> list[dict]:
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=30, trust_env=False)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
    return body["data"]["result"]


def label_values(prom: str, definition: str, chosen: dict[str, str]) -> list[str]:
    """Evaluate a Grafana `label_values(selector, label)` variable query."""
    inner = definition[len("label_values("):-1]
    selector, _, label = inner.rpartition(",")
    for name, value in chosen.items():
        selector = selector.replace(f"${name}", value)
    resp = httpx.get(f"{prom}/api/v1/series", params={"match[]": selector.strip()}, timeout=30, trust_env=False).json()
    return sorted({s[label.strip()] for s in resp["data"] if label.strip() in s})


def test_every_panel_query_returns_data(stack):
    drive_traffic(stack)
    time.sleep(3)
    prom = stack["prometheus"]
    failures = []
    for name in NAMES:
        dashboard = json.loads((ROOT / "grafana" / f"{name}.json").read_text())
        chosen: dict[str, str] = {}
        for var in dashboard["templating"]["list"]:
            if var["type"] != "query":
                continue
            values = label_values(prom, var["definition"], chosen)
            assert values, f"{name}: variable ${var['name']} has no values"
            chosen[var["name"]] = values[0]
        assert chosen["namespace"] == NAMESPACE and chosen["service"] == SERVICE
        for panel in dashboard["panels"]:
            for t in panel["targets"]:
                expr = t["expr"].replace("$__rate_interval", "1m")
                for var, value in chosen.items():
                    expr = expr.replace(f"${var}", value)
                result = query(prom, expr)
                finite = [s for s in result if not math.isnan(float(s["value"][1]))]
                if not finite:
                    failures.append(f"{name} / {panel['title']}: {expr} -> {result}")
    assert not failures, "queries without data:\n" + "\n".join(failures)


def test_router_reports_what_the_dashboards_show(stack):
    """Cross-check against the router's own view: the engine serves, the failing peer is gone."""
    workers = httpx.get(f"{stack['router']}/list_workers", timeout=5, trust_env=False).json()["urls"]
    assert workers == [stack["engine"]]


