"""Every dashboard query, evaluated by a real Prometheus scraping a live engine and a live
router after real traffic: each must parse and return data.

Traffic is shaped so that every panel has something to show: a request before any worker
exists (rejected, 503), chat requests sharing a prefix (cache-aware hits, radix-cache hits),
streaming (inter-token latency), a second router registered as a worker that answers
503 (worker failures, retries, its removal), and a second replica in front of the same
engine announcing its routing decisions to the scraped router (router peers).

The engine and the router require an API key (`apiKeySecret`), as in examples/multi-node.yaml:
Prometheus scrapes them with the jobs, bearer credentials and target labels derived from the
ServiceMonitor the operator generates for such an InferenceService (tests/prometheus_harness.py).
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from kube_harness import (
    engine_process,
    engine_server_available,
    router_process,
)
from prometheus_harness import query, scrape_configs, start_prometheus, wait_for_targets
from server_process import free_port

from radixfleet.operator.manifests.children import build_children
from radixfleet.operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("engine", "router", "fleet")
NAMESPACE, SERVICE = "ml", "chat"
API_KEY = "dashboards-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "chat-api-key", "namespace": NAMESPACE},
          "data": {"api-key": base64.b64encode(API_KEY.encode()).decode()}}
ISVC = {"apiVersion": "radixfleet.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": SERVICE, "namespace": NAMESPACE},
        "spec": {"model": {"path": "smollm2"}, "apiKeySecret": {"name": "chat-api-key"}, "monitoring": {"serviceMonitor": True}}}

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not engine_server_available(), reason="radixfleet.engine.server.serve cannot be imported yet (engine server not built)"),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus (Debian package) is not installed"),
]


def generated_jobs(engine: str, router: str, folder: Path) -> list[dict]:
    """Scrape jobs from the operator's ServiceMonitor for ISVC, targeting the live processes."""
    children = build_children(parse_spec(ISVC))
    (monitor,) = [m for m in children if m["kind"] == "ServiceMonitor"]
    services = [m for m in children if m["kind"] == "Service"]
    addresses = {f"{SERVICE}-engine": engine.split("//")[1], f"{SERVICE}-router": router.split("//")[1]}
    jobs = scrape_configs(monitor, services, {"chat-api-key": SECRET}, addresses, folder)
    assert len(jobs) == 2 and all(j["authorization"]["type"] == "Bearer" for j in jobs), jobs
    return jobs


@pytest.fixture(scope="module")
def stack():
    """keyed engine + keyed router + failing peer router + Prometheus; yields their URLs."""
    tmp = Path(tempfile.mkdtemp(prefix="rf-dashboards-"))
    engine = engine_process("127.0.0.1", free_port(), "smollm2", str(tmp / "engine.log"), "--api-key", API_KEY,
                            "--kv-events-port", str(free_port())).start()  # the router follows its KV events
    # The failing peer must stay registered until the test removes it through the API (the
    # worker_removals_total{reason="api"} panel); without a high limit its 503s could get it
    # evicted first, depending on where cache_aware sends the traffic.
    # A second replica (the twin) in front of the same engine announces its routing decisions
    # to the scraped router (the router-peer panels), as replicas of one InferenceService do.
    own, twins = free_port(), free_port()
    keyed = ("--api-key", API_KEY, "--worker-api-key", API_KEY)
    router = router_process(free_port(), "127.0.0.1", str(tmp / "router.log"), "--max-worker-retries", "1000", *keyed,
                            "--peer-port", str(own), "--peers", f"tcp://127.0.0.1:{twins}").start()
    twin = router_process(free_port(), "127.0.0.1", str(tmp / "twin.log"), *keyed,
                          "--peer-port", str(twins), "--peers", f"tcp://127.0.0.1:{own}").start()
    broken = router_process(free_port(), log_path=str(tmp / "broken.log")).start()  # no workers: answers 503
    jobs = generated_jobs(engine.url, router.url, tmp)
    prom = start_prometheus(jobs, tmp)
    procs = [engine, router, twin, broken, prom]
    try:
        for p in (router, twin, broken, prom):
            p.wait(30)
        engine.wait(180)
        yield {"engine": engine.url, "router": router.url, "twin": twin.url, "broken": broken.url,
               "prometheus": prom.url, "jobs": jobs}
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
    with httpx.Client(timeout=120, trust_env=False, headers=AUTH) as c, ThreadPoolExecutor(4) as pool:
        # No workers yet: the router rejects (503, rejected_requests_total{reason="no_workers"}).
        assert c.post(f"{router}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}).status_code == 503
        for url in (urls["engine"], urls["broken"]):
            assert c.post(f"{router}/add_worker", params={"url": url}).status_code == 200
        assert c.post(f"{urls['twin']}/add_worker", params={"url": urls["engine"]}).status_code == 200
        # Unrelated prompts: cache_aware sends them to the smallest tree, i.e. the failing peer,
        # which answers 503; the router retries on the engine (worker_failures_total, retries_total).
        for text in ("Zebras run", "Quantum foam is"):
            resp = c.post(f"{router}/generate", json={"text": text, "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
            assert resp.status_code == 200, resp.text
        for wave in range(2):
            chat_wave(c, pool, router, wave)
            chat_wave(c, pool, urls["twin"], wave)
            time.sleep(2.5)  # let Prometheus scrape between waves so rates are non-zero
        # What the operator does on scale-down (worker_removals_total{reason="api"}).
        assert c.post(f"{router}/remove_worker", params={"url": urls["broken"]}).status_code == 200


def chat_wave(client: httpx.Client, pool: ThreadPoolExecutor, router: str, wave: int) -> None:
    """Concurrent chats sharing a long system prompt (cache-aware and radix-cache hits; the
    engine batches them), one of them streamed (inter-token latency)."""
    system = "You are a concise assistant. Answer in one short sentence. " * 4
    bodies = [{"model": "smollm2", "max_tokens": 4, "temperature": 0,
               "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Question {wave}-{i}: name a colour."}]}
              for i in range(3)]
    list(pool.map(lambda ib: _chat(client, router, ib[1], stream=ib[0] == 1), enumerate(bodies)))


def label_values(prom: str, definition: str, chosen: dict[str, str]) -> list[str]:
    """Evaluate a Grafana `label_values(selector, label)` variable query."""
    inner = definition[len("label_values("):-1]
    selector, _, label = inner.rpartition(",")
    for name, value in chosen.items():
        selector = selector.replace(f"${name}", value)
    resp = httpx.get(f"{prom}/api/v1/series", params={"match[]": selector.strip()}, timeout=30, trust_env=False).json()
    return sorted({s[label.strip()] for s in resp["data"] if label.strip() in s})


def panels_without_data(prom: str) -> list[str]:
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
    return failures


def test_every_panel_query_returns_data(stack):
    drive_traffic(stack)
    # A rate needs two successful scrapes that see the counter move. On a loaded 2-core CI
    # machine a 1 s scrape can time out while the engine computes, so a panel whose counter
    # moved only between missed scrapes shows nothing yet (NaN = 0/0): keep the traffic
    # coming, a wave every few seconds, until every panel has data or a minute has passed.
    deadline = time.monotonic() + 60
    with httpx.Client(timeout=120, trust_env=False, headers=AUTH) as c, ThreadPoolExecutor(4) as pool:
        for wave in range(2, 1000):
            time.sleep(3)
            failures = panels_without_data(stack["prometheus"])
            if not failures or time.monotonic() > deadline:
                break
            chat_wave(c, pool, stack["router"], wave)
            chat_wave(c, pool, stack["twin"], wave)
    assert not failures, "queries without data:\n" + "\n".join(failures)


def test_router_reports_what_the_dashboards_show(stack):
    """Cross-check against the router's own view: the engine serves, the failing peer is gone."""
    workers = httpx.get(f"{stack['router']}/list_workers", timeout=5, trust_env=False, headers=AUTH).json()["urls"]
    assert workers == [stack["engine"]]


def test_keyed_targets_are_up_with_the_generated_credentials(stack):
    """Without the key /metrics answers 401; with the ServiceMonitor's credentials both targets are up."""
    for name in ("engine", "router"):
        assert httpx.get(f"{stack[name]}/metrics", timeout=5, trust_env=False).status_code == 401
    health = wait_for_targets(stack["prometheus"], stack["jobs"])
    assert health == {j["job_name"]: "up" for j in stack["jobs"]}, health
    for family in ("radixfleet_engine_num_queued_requests", "radixfleet_router_workers"):
        result = query(stack["prometheus"], f'{family}{{radixfleet_io_service="{SERVICE}", namespace="{NAMESPACE}"}}')
        assert result, f"{family} is not in Prometheus"
