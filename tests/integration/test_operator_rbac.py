"""Issue #20 item 4: the chart's RBAC grants the operator nothing beyond the API calls it makes.

The KMock operator tests record every call the operator makes (``kube_harness.OPERATOR_CALLS``,
by its user agent); this module runs after them (pytest runs modules in name order) and
compares, in both directions, with the rules of the chart's roles, every optional rule on
(``rbac.serviceMonitors``, peering). Run it together with them:
``pytest tests/integration/test_hub_operator.py tests/integration/test_operator_*.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from kube_harness import OPERATOR_CALLS

TEMPLATES = Path(__file__).resolve().parents[2] / "charts" / "radixfleet" / "templates"

# Rules the operator needs only on paths the KMock tests do not take, each with the reason.
# (Found unused and removed from the chart: pods get, inferenceservices/status get,
# poddisruptionbudgets list and delete (always wanted, never pruned; garbage-collected with
# their owner), events in events.k8s.io (kopf posts core v1 events).)
CHANGED_CHILD = "apply() patches a child whose manifest changed; the tests never change one after creating it"
PRUNED_CHILD = "prune() deletes a child the spec no longer wants; the tests never drop one"
UNEXERCISED = {
    ("", "services", "patch"): CHANGED_CHILD,
    ("policy", "poddisruptionbudgets", "patch"): CHANGED_CHILD,
    ("monitoring.coreos.com", "servicemonitors", "patch"): CHANGED_CHILD,
    ("apps", "deployments", "delete"): PRUNED_CHILD + " (e.g. single-node to multi-node)",
    ("monitoring.coreos.com", "servicemonitors", "delete"): PRUNED_CHILD + " (serviceMonitor turned off)",
    ("kopf.dev", "kopfpeerings", "get"): "peering (several operator replicas); the tests run standalone",
    ("kopf.dev", "kopfpeerings", "list"): "peering, as above",
    ("kopf.dev", "kopfpeerings", "watch"): "peering, as above",
    ("kopf.dev", "kopfpeerings", "patch"): "peering, as above",
    ("kopf.dev", "clusterkopfpeerings", "get"): "cluster-wide peering, as above",
    ("kopf.dev", "clusterkopfpeerings", "list"): "cluster-wide peering, as above",
    ("kopf.dev", "clusterkopfpeerings", "watch"): "cluster-wide peering, as above",
    ("kopf.dev", "clusterkopfpeerings", "patch"): "cluster-wide peering, as above",
}


def chart_rules() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) granted by the discovery ClusterRole and the namespaced rules,
    with every ``{{ if }}`` taken (the widest role the chart can render)."""
    text = (TEMPLATES / "_helpers.tpl").read_text()
    body = text.split('{{- define "radixfleet.namespacedRules" -}}', 1)[1].split("{{- end -}}", 1)[0]
    rbac = (TEMPLATES / "rbac.yaml").read_text()
    discovery = rbac.split("rules:", 1)[1].split("---", 1)[0]
    rules = []
    for chunk in (body, discovery):
        plain = "\n".join(line for line in chunk.splitlines() if not re.match(r"\s*\{\{", line))
        rules += yaml.safe_load(plain)
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_the_operator_calls_only_what_its_role_grants_and_uses_all_of_it():
    if not OPERATOR_CALLS:
        pytest.skip("no operator calls recorded: run this module after the KMock operator tests (see the docstring)")
    granted = chart_rules()
    assert not OPERATOR_CALLS - granted, f"calls outside the chart's RBAC: {sorted(OPERATOR_CALLS - granted)}"
    unused = granted - OPERATOR_CALLS - set(UNEXERCISED)
    assert not unused, f"rules the operator never used (remove them, or list them in UNEXERCISED): {sorted(unused)}"
    assert not set(UNEXERCISED) & OPERATOR_CALLS, "now exercised: drop from UNEXERCISED"
    assert set(UNEXERCISED) <= granted
