"""The optional ServiceMonitor (Prometheus Operator) scraping the engine and the router.

It selects this InferenceService's Services labelled `radixfleet.io/metrics=true`
(the router Service and the headless engine Service) on their `http` port.
"""

from __future__ import annotations

from typing import Any

from radixfleet.operator import names
from radixfleet.operator.spec import InferenceServiceSpec

SERVICE_MONITOR_API = "monitoring.coreos.com/v1"


def build_service_monitor(spec: InferenceServiceSpec) -> dict[str, Any]:
    return {
        "apiVersion": SERVICE_MONITOR_API,
        "kind": "ServiceMonitor",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": names.labels(spec, "monitoring")},
        "spec": {
            "selector": {"matchLabels": {names.LABEL_SERVICE: spec.name, names.LABEL_METRICS: "true"}},
            "namespaceSelector": {"matchNames": [spec.namespace]},
            "endpoints": [{"port": names.HTTP_PORT_NAME, "path": "/metrics", "interval": spec.monitoring.interval}],
            # Dashboards filter by the owning InferenceService through this label.
            "targetLabels": [names.LABEL_SERVICE],
        },
    }
