"""The optional ServiceMonitor (Prometheus Operator) scraping the engine and the router.

It selects this InferenceService's Services labelled `radixfleet.io/metrics=true`
(the router Service and the headless engine Service) on their `http` port. With
`apiKeySecret`, `/metrics` answers 401 without the key, so each endpoint sends it as a bearer
token read from that Secret (in the ServiceMonitor's namespace, as Prometheus requires).
"""

from __future__ import annotations

from typing import Any

from radixfleet.operator import names
from radixfleet.operator.spec import InferenceServiceSpec

SERVICE_MONITOR_API = "monitoring.coreos.com/v1"


def build_service_monitor(spec: InferenceServiceSpec) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"port": names.HTTP_PORT_NAME, "path": "/metrics", "interval": spec.monitoring.interval}
    if spec.api_key_secret is not None:
        secret = spec.api_key_secret
        endpoint["authorization"] = {"type": "Bearer", "credentials": {"name": secret.name, "key": secret.key}}
    return {
        "apiVersion": SERVICE_MONITOR_API,
        "kind": "ServiceMonitor",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": names.labels(spec, "monitoring")},
        "spec": {
            "selector": {"matchLabels": {names.LABEL_SERVICE: spec.name, names.LABEL_METRICS: "true"}},
            "namespaceSelector": {"matchNames": [spec.namespace]},
            "endpoints": [endpoint],
            # Dashboards filter by the owning InferenceService through this label.
            "targetLabels": [names.LABEL_SERVICE],
        },
    }
