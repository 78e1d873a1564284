"""Dashboards, statically: Grafana's JSON model (schemaVersion >= 39) as decoded by the
grafana-foundation-sdk, template variables, metric names that exist in the engine's and
the router's catalogs, PromQL that Prometheus' own parser accepts (promtool), and the
chart's copies identical to grafana/."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from radixfleet.engine.server.metric_names import ENGINE_METRICS
from radixfleet.operator.autoscale import METRIC_SOURCES
from radixfleet.operator.router_client import INFLIGHT_METRIC
from radixfleet.router.metric_names import ROUTER_METRICS

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
NAMES = ("engine", "router", "fleet")
METRIC_RE = re.compile(r"\bradixfleet_(?!io_service\b)[a-z_]+\b")  # the service label is not a metric


def load(name: str) -> dict:
    return json.loads((GRAFANA / f"{name}.json").read_text())


def catalog() -> set[str]:
    names = set()
    for family in (*ENGINE_METRICS, *ROUTER_METRICS):
        names.add(family.name)
        if family.kind == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return exprs + [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def concrete(expr: str) -> str:
    """The query Grafana sends once variables are filled in."""
    return (expr.replace("$__rate_interval", "1m").replace("$namespace", ".*")
            .replace("$service", ".*").replace("$model", ".*"))


def test_dashboards_are_generated_and_shipped_in_the_chart():
    spec = importlib.util.spec_from_file_location("generate", GRAFANA / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for name in NAMES:
        text = (GRAFANA / f"{name}.json").read_text()
        assert text == generate.render(generate.DASHBOARDS[name]), f"{name}.json is stale: run python grafana/generate.py"
        assert (ROOT / "charts" / "radixfleet" / "dashboards" / f"{name}.json").read_text() == text


@pytest.mark.parametrize("name", NAMES)
def test_dashboard_decodes_as_grafana_json_model(name):
    from grafana_foundation_sdk.models.dashboard import Dashboard

    raw = load(name)
    model = Dashboard.from_json(raw)
    assert model.schema_version >= 39 and model.uid == f"radixfleet-{name}" and model.title
    assert len(model.panels) == len(raw["panels"]) >= 8
    ids = [p["id"] for p in raw["panels"]]
    assert len(set(ids)) == len(ids)
    for p in raw["panels"]:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, p["title"]
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
    variables = {v["name"] for v in raw["templating"]["list"]}
    assert {"datasource", "namespace", "service"} <= variables
    if name != "router":  # router series carry no model label
        assert "model" in variables


@pytest.mark.parametrize("name", NAMES)
def test_every_metric_in_a_dashboard_is_in_the_catalogs(name):
    known = catalog()
    used = {m for expr in expressions(load(name)) for m in METRIC_RE.findall(expr)}
    assert used, "no metrics referenced"
    assert used <= known, f"unknown metric names: {sorted(used - known)}"


def test_operator_reads_metrics_that_exist():
    """The drain (router in-flight gauge) and the autoscaler (engine gauges) read these."""
    assert INFLIGHT_METRIC in catalog()
    assert set(METRIC_SOURCES.values()) <= catalog()
    (family,) = [f for f in ROUTER_METRICS if f.name == INFLIGHT_METRIC]
    assert family.labels == ("worker",)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_every_query_parses_in_prometheus(tmp_path):
    """promtool parses each panel query (as a recording rule) with Prometheus' own parser."""
    rules = []
    for name in NAMES:
        for i, expr in enumerate(e for e in expressions(load(name)) if not e.startswith("label_values")):
            rules.append({"record": f"radixfleet:{name}:q{i}", "expr": concrete(expr)})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout
