"""PodDisruptionBudgets: evictions (node drains, cluster upgrades) take engine and router
pods `spec.disruption.maxUnavailable` at a time, one budget per component, so a starting
engine (which may load a model for many minutes) never blocks evicting a router."""

from __future__ import annotations

from typing import Any

from radixfleet.operator import names
from radixfleet.operator.spec import InferenceServiceSpec


def pdb_name(spec: InferenceServiceSpec, component: str) -> str:
    return f"{spec.name}-{component}"


def build_pod_disruption_budget(spec: InferenceServiceSpec, component: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": pdb_name(spec, component), "namespace": spec.namespace, "labels": names.labels(spec, component)},
        "spec": {
            "maxUnavailable": spec.disruption.max_unavailable,
            "selector": {"matchLabels": names.selector_labels(spec, component)},
            # A pod that is not Ready serves nothing: evicting it never costs a request.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def build_pod_disruption_budgets(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    return [build_pod_disruption_budget(spec, names.ENGINE), build_pod_disruption_budget(spec, names.ROUTER)]
