"""A real Prometheus scrapes the live server every second; after traffic, a PromQL query for
every family of ``engine/server/metric_names.py`` returns data, and ``promtool check metrics``
accepts the exposition."""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from server_process import default_model_dir, engine_server, free_port

from radixfleet.engine.server.metric_names import ENGINE_METRICS

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
pytestmark = pytest.mark.skipif(not Path(PROMETHEUS).exists(),
                                reason="needs the Debian package 'prometheus' (installed by .ci/run)")


@pytest.fixture(scope="module")
def url():
    with engine_server(default_model_dir()) as u:
        yield u


@pytest.fixture(scope="module")
def prometheus(url):
    """(query function) for a Prometheus scraping ``url`` every second."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: engine\n    static_configs: [{{targets: ['{url.removeprefix('http://')}']}}]\n")
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        api = f"http://127.0.0.1:{port}/api/v1/query"

        def query(promql: str) -> list:
            resp = httpx.get(api, params={"query": promql}, timeout=10)
            resp.raise_for_status()
            return resp.json()["data"]["result"]

        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if [r for r in query('up{job="engine"}') if r["value"][1] == "1"]:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "Prometheus never scraped the server"
                time.sleep(0.5)
            yield query
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def traffic(url: str) -> None:
    with httpx.Client(base_url=url, timeout=120) as c:
        greedy = {"temperature": 0, "max_new_tokens": 12}
        for _ in range(2):  # the second pass hits the radix cache
            assert c.post("/generate", json={"text": ["The capital of France is", "Water boils at"],
                                             "sampling_params": greedy}).status_code == 200
        with c.stream("POST", "/generate", json={"text": "Once upon a time", "stream": True,
                                                 "sampling_params": greedy}) as resp:
            assert resp.status_code == 200 and list(resp.iter_lines())[-2] == "data: [DONE]"
        chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        assert c.post("/v1/chat/completions", json=chat).status_code == 200


def test_exposition_passes_promtool(url):
    traffic(url)
    text = httpx.get(url + "/metrics").text
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for fam in ENGINE_METRICS:
        # prometheus-client writes a counter's TYPE line with or without _total, by version
        names = {fam.name, fam.name.removesuffix("_total")}
        assert any(f"# TYPE {n} {fam.kind}\n" in text for n in names), fam.name


def promql_for(fam) -> str:
    if fam.kind == "histogram":
        return f"histogram_quantile(0.5, sum by (le) (rate({fam.name}_bucket[1m])))"
    if fam.kind == "counter":
        return f"sum by (model_name) (increase({fam.name}[1m]))"
    return f"max by (model_name) ({fam.name})"


def test_every_family_answers_promql_after_traffic(url, prometheus):
    traffic(url)  # after Prometheus started, so rates see the increase
    time.sleep(3)  # a few more scrapes
    missing = {}
    for fam in ENGINE_METRICS:
        q = promql_for(fam)
        result = prometheus(q)
        value = float(result[0]["value"][1]) if result else math.nan
        ok = bool(result) and not math.isnan(value)
        if fam.kind != "gauge":
            ok = ok and value > 0
        if not ok:
            missing[q] = result
    assert not missing, missing
    finished = prometheus('sum by (finish_reason) (radixfleet_engine_requests_total{model_name!=""})')
    assert {r["metric"]["finish_reason"] for r in finished} >= {"length"}
