"""A real Prometheus (Debian's binary) for tests, and the scrape configuration a Prometheus
Operator would derive from a ServiceMonitor.

`scrape_configs` translates what the operator or the chart generates: each Service the
monitor selects becomes a job (named after the Service) whose targets are the live processes
standing in for its endpoints; each endpoint's `path` and bearer `authorization` (a Secret key)
become `metrics_path` and `authorization.credentials_file` (the Secret's value in a file); the
monitor's `targetLabels` become target labels, sanitised as the Prometheus Operator does.
"""

from __future__ import annotations

import base64
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml
from kube_harness import Proc
from server_process import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against `labels`."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"Exists": key in labels, "DoesNotExist": key not in labels,
              "In": labels.get(key) in values, "NotIn": labels.get(key) not in values}[op]
        if not ok:
            return False
    return True


def _credentials_file(auth: Mapping[str, Any], secrets: Mapping[str, Mapping[str, Any]], folder: Path) -> str:
    ref = auth["credentials"]
    value = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]])
    path = folder / f"{ref['name']}-{ref['key']}"
    path.write_bytes(value)
    return str(path)


def scrape_configs(monitor: Mapping[str, Any], services: list[Mapping[str, Any]], secrets: Mapping[str, Mapping[str, Any]],
                   addresses: Mapping[str, str], folder: Path, interval: str = "1s") -> list[dict[str, Any]]:
    """Jobs for the `services` that `monitor` selects and `addresses` maps (a Service's name ->
    the host:port serving it); `secrets` maps a Secret's name to its manifest. `interval` replaces
    the endpoint's (tests scrape every second)."""
    spec = monitor["spec"]
    jobs = []
    for svc in services:
        labels = svc["metadata"].get("labels") or {}
        if not selects(spec["selector"], labels) or svc["metadata"]["name"] not in addresses:
            continue
        target_labels = {"namespace": svc["metadata"]["namespace"]}
        target_labels |= {re.sub(r"[^a-zA-Z0-9_]", "_", k): labels[k] for k in spec.get("targetLabels") or () if k in labels}
        for i, endpoint in enumerate(spec["endpoints"]):
            assert endpoint["port"] in [p["name"] for p in svc["spec"]["ports"]], (svc["metadata"]["name"], endpoint)
            job: dict[str, Any] = {
                "job_name": f"{svc['metadata']['name']}-{i}", "scrape_interval": interval,
                "metrics_path": endpoint.get("path", "/metrics"),
                "static_configs": [{"targets": [addresses[svc["metadata"]["name"]]], "labels": target_labels}],
            }
            if auth := endpoint.get("authorization"):
                job["authorization"] = {"type": auth.get("type", "Bearer"), "credentials_file": _credentials_file(auth, secrets, folder)}
            jobs.append(job)
    return jobs


def start_prometheus(jobs: list[dict[str, Any]], folder: Path) -> Proc:
    """Prometheus scraping `jobs` (not yet ready: call `.wait()`)."""
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": jobs}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    return Proc([PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                f"http://127.0.0.1:{port}", health="/-/ready", log_path=str(folder / "prometheus.log")).start()


def query(prom: str, expr: str) -> list[dict]:
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=30, trust_env=False)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
    return body["data"]["result"]


def wait_for_targets(prom: str, jobs: list[dict[str, Any]], timeout: float = 30.0) -> dict[str, str]:
    """Wait until every job's target has been scraped once; return job -> health ('up'/'down')."""
    deadline = time.monotonic() + timeout
    while True:
        active = httpx.get(f"{prom}/api/v1/targets", timeout=10, trust_env=False).json()["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in active}
        if all(health.get(j["job_name"], "unknown") != "unknown" for j in jobs) or time.monotonic() > deadline:
            return health
        time.sleep(0.3)
