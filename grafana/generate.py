"""Generates the Grafana dashboards (engine, router, fleet) as Grafana dashboard JSON.

    python grafana/generate.py        # rewrites grafana/*.json and the chart's copies

Every query uses only metric names from engine/server/metric_names.py and router/metric_names.py
(tests/integration/test_dashboards_catalog.py checks that; test_dashboards_live.py runs every query through a real
Prometheus). Labels `namespace` and `radixfleet_io_service` come from the ServiceMonitor
(`targetLabels: [radixfleet.io/service]`); `model_name` from the engine itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHART_COPY = HERE.parent / "charts" / "radixfleet" / "dashboards"
SCHEMA_VERSION = 39
RATE = "$__rate_interval"
ENGINE_SEL = 'namespace=~"$namespace", radixfleet_io_service=~"$service", model_name=~"$model"'
ROUTER_SEL = 'namespace=~"$namespace", radixfleet_io_service=~"$service"'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
E = "radixfleet_engine_"
R = "radixfleet_router_"


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def panel(title: str, targets: list[tuple[str, str]], unit: str, *, kind: str = "timeseries", w: int = 12, h: int = 8,
          description: str = "") -> dict[str, Any]:
    """One panel; `targets` are (PromQL, legend) pairs. Grid position is set by `layout`."""
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": h, "w": w, "x": 0, "y": 0},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}} if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
    }


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Left-to-right rows of a 24-column grid; ids in order."""
    x = y = row_h = 0
    for i, p in enumerate(panels, start=1):
        pos = p["gridPos"]
        if x + pos["w"] > 24:
            x, y, row_h = 0, y + row_h, 0
        pos["x"], pos["y"] = x, y
        x, row_h = x + pos["w"], max(row_h, pos["h"])
        p["id"] = i
    return panels


def variable(name: str, label: str, query: str, *, include_all: bool = True) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
        "refresh": 2, "includeAll": include_all, "multi": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1, "options": [],
    }


def variables(with_model: bool, source_metric: str) -> list[dict[str, Any]]:
    out = [{
        "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
        "current": {"selected": False, "text": "Prometheus", "value": "prometheus"}, "options": [], "refresh": 1,
    }]
    out.append(variable("namespace", "Namespace", f"label_values({source_metric}, namespace)"))
    out.append(variable("service", "InferenceService", f'label_values({source_metric}{{namespace=~"$namespace"}}, radixfleet_io_service)'))
    if with_model:
        out.append(variable("model", "Model", f'label_values({source_metric}{{namespace=~"$namespace", radixfleet_io_service=~"$service"}}, model_name)'))
    return out


def dashboard(uid: str, title: str, panels: list[dict[str, Any]], with_model: bool, source_metric: str) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "tags": ["radixfleet", "llm"], "timezone": "browser", "editable": True,
        "schemaVersion": SCHEMA_VERSION, "version": 1, "refresh": "30s", "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "templating": {"list": variables(with_model, source_metric)},
        "annotations": {"list": []}, "links": [], "panels": layout(panels),
    }


def quantiles(metric: str, sel: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{sel}}}[{RATE}])))", f"p{int(q * 100)}")
            for q in (0.5, 0.9, 0.99)]


def engine_dashboard() -> dict[str, Any]:
    s = ENGINE_SEL
    panels = [
        panel("Token throughput", [
            (f"sum(rate({E}generation_tokens_total{{{s}}}[{RATE}]))", "generated tok/s"),
            (f"sum(rate({E}prompt_tokens_total{{{s}}}[{RATE}]))", "prompt tok/s"),
        ], "tokens/s"),
        panel("Finished requests by reason", [
            (f"sum by (finish_reason) (rate({E}requests_total{{{s}}}[{RATE}]))", "{{finish_reason}}"),
        ], "reqps"),
        panel("Time to first token", quantiles(f"{E}time_to_first_token_seconds", s), "s", w=8),
        panel("Inter-token latency", quantiles(f"{E}inter_token_latency_seconds", s), "s", w=8),
        panel("End-to-end latency", quantiles(f"{E}e2e_request_latency_seconds", s), "s", w=8),
        panel("Running and queued requests", [
            (f"sum({E}num_running_requests{{{s}}})", "running"),
            (f"sum({E}num_queued_requests{{{s}}})", "queued"),
        ], "short", w=8),
        panel("Queue time", quantiles(f"{E}queue_time_seconds", s), "s", w=8),
        panel("KV cache usage", [(f"max by (instance) ({E}kv_cache_usage_ratio{{{s}}})", "{{instance}}")], "percentunit", w=8),
        panel("Radix cache hit rate", [
            (f"sum(rate({E}cached_prompt_tokens_total{{{s}}}[{RATE}])) / sum(rate({E}prompt_tokens_total{{{s}}}[{RATE}]))", "hit rate (tokens)"),
            (f"avg({E}cache_hit_ratio{{{s}}})", "recent hit ratio (engine)"),
        ], "percentunit"),
        panel("Decode throughput per engine", [
            (f"sum by (instance) ({E}generation_throughput_tokens_per_second{{{s}}})", "{{instance}}"),
        ], "tokens/s"),
    ]
    return dashboard("radixfleet-engine", "radixfleet / Engine", panels, True, f"{E}num_running_requests")


def router_dashboard() -> dict[str, Any]:
    s = ROUTER_SEL
    panels = [
        panel("Requests by worker and status", [
            (f"sum by (worker, status) (rate({R}requests_total{{{s}}}[{RATE}]))", "{{worker}} {{status}}"),
        ], "reqps"),
        panel("Request duration", quantiles(f"{R}request_duration_seconds", s), "s"),
        panel("Retries", [(f"sum by (route) (rate({R}retries_total{{{s}}}[{RATE}]))", "{{route}}")], "reqps", w=8),
        panel("Worker failures", [
            (f"sum by (worker, reason) (rate({R}worker_failures_total{{{s}}}[{RATE}]))", "{{worker}} {{reason}}"),
        ], "reqps", w=8),
        panel("Rejected requests", [
            (f"sum by (reason) (rate({R}rejected_requests_total{{{s}}}[{RATE}]))", "{{reason}}"),
        ], "reqps", w=8),
        panel("In-flight requests per worker", [(f"sum by (worker) ({R}in_flight_requests{{{s}}})", "{{worker}}")], "short", w=8),
        panel("Worker health", [(f"min by (worker) ({R}worker_healthy{{{s}}})", "{{worker}}")], "bool_yes_no", w=8,
              description="1 = passing health checks with a closed circuit"),
        panel("Circuit breaker state", [(f"max by (worker) ({R}circuit_breaker_state{{{s}}})", "{{worker}}")], "short", w=8,
              description="0 closed, 1 half-open, 2 open"),
        panel("Cache hit ratio of routing decisions", [
            (f'sum(rate({R}routing_decisions_total{{{s}, decision=~"hit|cached"}}[{RATE}])) / sum(rate({R}routing_decisions_total{{{s}}}[{RATE}]))', "hit ratio"),
        ], "percentunit", w=8, description="requests sent where a prefix was (cache_aware: thought to be; precise: reported) cached"),
        panel("Cache-aware decisions", [
            (f"sum by (decision) (rate({R}cache_aware_decisions_total{{{s}}}[{RATE}]))", "{{decision}}"),
        ], "short", w=8),
        panel("Radix tree size per worker", [(f"sum by (worker) ({R}tree_size_characters{{{s}}})", "{{worker}}")], "short", w=8),
        panel("Routing latency p99", [
            (f"histogram_quantile(0.99, sum by (le) (rate({R}routing_latency_seconds_bucket{{{s}}}[{RATE}])))", "p99"),
        ], "s", w=8),
        panel("Workers and removals", [
            (f"sum({R}workers{{{s}}})", "registered"),
            (f"sum by (reason) (increase({R}worker_removals_total{{{s}}}[{RATE}]))", "removed ({{reason}})"),
        ], "short", w=8),
        # Routing on the engines' KV events (precise; auto picks it when every worker publishes).
        panel("Routing decisions by policy", [
            (f"sum by (policy, decision) (rate({R}routing_decisions_total{{{s}}}[{RATE}]))", "{{policy}} {{decision}}"),
        ], "short", w=8, description="auto delegates to precise or cache_aware per request"),
        panel("Cached tokens: predicted vs reported", [
            (f"sum(rate({R}cached_tokens_predicted_total{{{s}}}[{RATE}]))", "predicted"),
            (f"sum(rate({R}cached_tokens_reported_total{{{s}}}[{RATE}]))", "reported by the engines"),
        ], "short", w=8, description="precise: prompt tokens/s the KV events said were cached, and what the engines reported"),
        panel("Predictions against the engines", [
            (f"sum by (outcome) (rate({R}cached_tokens_predictions_total{{{s}}}[{RATE}]))", "{{outcome}}"),
        ], "short", w=8, description="exact: predicted cached tokens equal the reported ones, in whole blocks"),
        panel("KV event lag p90", [
            (f"histogram_quantile(0.9, sum by (le) (rate({R}kv_event_lag_seconds_bucket{{{s}}}[{RATE}])))", "p90"),
        ], "s", w=8, description="from an engine publishing a KV-event message to the router receiving it"),
        panel("Workers with live KV events", [(f"sum by (worker) ({R}kv_events_in_sync{{{s}}})", "{{worker}}")],
              "bool_yes_no", w=8, description="0: scored by the approximate tree until it resyncs"),
        panel("KV-event resyncs", [
            (f"sum by (worker, reason) (increase({R}kv_event_resyncs_total{{{s}}}[{RATE}]))", "{{worker}} {{reason}}"),
        ], "short", w=8),
        panel("Decisions heard from router peers", [
            (f"sum by (outcome) (rate({R}peer_routes_total{{{s}}}[{RATE}]))", "{{outcome}}"),
        ], "short", w=12, description="other replicas' routing decisions: applied (counted as queued on the worker until "
                                     "its engine reports it), known (the worker already held or queued the prompt), invalid"),
        panel("Peer announcement lag p90", [
            (f"histogram_quantile(0.9, sum by (le) (rate({R}peer_route_lag_seconds_bucket{{{s}}}[{RATE}])))", "p90"),
        ], "s", w=12, description="from a router replica announcing a decision to this replica hearing it"),
        # Admission control.
        panel("Admission queue depth", [(f"sum({R}queue_depth{{{s}}})", "waiting")], "short", w=8),
        panel("Queue waits by outcome", [
            (f"sum by (outcome) (rate({R}queue_wait_seconds_count{{{s}}}[{RATE}]))", "{{outcome}}"),
        ], "reqps", w=8, description="admitted after waiting, timed out (408), or the client went away"),
        panel("Mean wait in the queue", [
            (f"sum(rate({R}queue_wait_seconds_sum{{{s}}}[{RATE}])) / clamp_min(sum(rate({R}queue_wait_seconds_count{{{s}}}[{RATE}])), 1e-9)", "mean"),
        ], "s", w=8),
    ]
    return dashboard("radixfleet-router", "radixfleet / Router", panels, False, f"{R}workers")


def fleet_dashboard() -> dict[str, Any]:
    """One row per InferenceService: traffic, latency, capacity at a glance."""
    es, rs = ENGINE_SEL, ROUTER_SEL
    by = "radixfleet_io_service"
    legend = "{{" + by + "}}"
    panels = [
        panel("Requests/s per InferenceService", [(f"sum by ({by}) (rate({R}requests_total{{{rs}}}[{RATE}]))", legend)], "reqps"),
        panel("Error ratio per InferenceService", [
            (f'sum by ({by}) (rate({R}requests_total{{{rs}, status=~"5.."}}[{RATE}])) / sum by ({by}) (rate({R}requests_total{{{rs}}}[{RATE}]))', legend),
        ], "percentunit"),
        panel("Generated tokens/s per InferenceService", [
            (f"sum by ({by}) (rate({E}generation_tokens_total{{{es}}}[{RATE}]))", legend)], "tokens/s", w=8),
        panel("TTFT p90 per InferenceService", [
            (f"histogram_quantile(0.9, sum by ({by}, le) (rate({E}time_to_first_token_seconds_bucket{{{es}}}[{RATE}])))", legend)], "s", w=8),
        panel("E2E latency p90 per InferenceService", [
            (f"histogram_quantile(0.9, sum by ({by}, le) (rate({R}request_duration_seconds_bucket{{{rs}}}[{RATE}])))", legend)], "s", w=8),
        panel("Registered workers", [(f"sum by ({by}) ({R}workers{{{rs}}})", legend)], "short", kind="stat", w=6, h=5),
        panel("Healthy workers", [(f"sum by ({by}) ({R}worker_healthy{{{rs}}})", legend)], "short", kind="stat", w=6, h=5),
        panel("Queued requests", [(f"sum by ({by}) ({E}num_queued_requests{{{es}}})", legend)], "short", kind="stat", w=6, h=5),
        panel("KV cache usage (max)", [(f"max by ({by}) ({E}kv_cache_usage_ratio{{{es}}})", legend)], "percentunit", kind="gauge", w=6, h=5),
    ]
    return dashboard("radixfleet-fleet", "radixfleet / Fleet overview", panels, True, f"{E}num_running_requests")


DASHBOARDS = {"engine": engine_dashboard, "router": router_dashboard, "fleet": fleet_dashboard}


def render(build) -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> None:
    CHART_COPY.mkdir(parents=True, exist_ok=True)
    for name, build in DASHBOARDS.items():
        text = render(build)
        for folder in (HERE, CHART_COPY):
            (folder / f"{name}.json").write_text(text)


if __name__ == "__main__":
    main()
