"""Idempotent apply: create what is missing, patch what drifted, touch nothing else.

"Drifted" means some field the builder sets differs from the live object. Fields the API
server adds (defaults, status, managedFields) are ignored, so re-applying an unchanged
spec makes no write at all (no resourceVersion churn, no rollout).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from radixfleet.operator.kube import KubeApi


class Outcome(enum.Enum):
    CREATED = "created"
    PATCHED = "patched"
    UNCHANGED = "unchanged"


def is_subset(desired: Any, live: Any) -> bool:
    """True if every field in `desired` has the same value in `live` (lists element-wise)."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(k in live and is_subset(v, live[k]) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(desired) == len(live) and all(is_subset(d, x) for d, x in zip(desired, live, strict=True))
    if isinstance(desired, (int, float)) and not isinstance(desired, bool) and isinstance(live, str):
        return str(desired) == live  # quantities may come back as strings
    return desired == live


async def apply(api: KubeApi, manifest: Mapping[str, Any]) -> Outcome:
    meta = manifest["metadata"]
    live = await api.get(manifest["kind"], meta.get("namespace"), meta["name"])
    if live is None:
        await api.create(manifest)
        return Outcome.CREATED
    if is_subset(manifest, live):
        return Outcome.UNCHANGED
    # A merge patch replaces lists whole (containers, args, ports): exactly the desired ones.
    await api.patch(manifest["kind"], meta.get("namespace"), meta["name"], manifest)
    return Outcome.PATCHED
