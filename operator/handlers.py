"""kopf handlers, kept thin: parse, call the reconciler, map errors to kopf's retry model.

`build_registry(rt)` registers everything on a fresh `kopf.OperatorRegistry`, so a test
can run the real operator loop against KMock with its own `Runtime`.

Errors: an invalid spec -> Failed status, a Warning event, `kopf.PermanentError` (no
retries until the spec changes); API or router failures -> `kopf.TemporaryError` with
`config.retry_delay_seconds` backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from radixfleet.operator import names
from radixfleet.operator.apply import is_subset
from radixfleet.operator.autoscale import ScaleHistory, observe, recommend, stabilize
from radixfleet.operator.endpoints import ready_workers
from radixfleet.operator.kube import Credentials, KubeError
from radixfleet.operator.reconciler import (
    Emit,
    deregister_terminating,
    list_pods,
    reconcile,
    resync_workers,
)
from radixfleet.operator.router_client import RouterError
from radixfleet.operator.runtime import Runtime
from radixfleet.operator.spec import InferenceServiceSpec, SpecError, parse_spec
from radixfleet.operator.status import failed_status

log = logging.getLogger(__name__)
ISVC = {"group": names.GROUP, "version": names.VERSION, "plural": names.PLURAL}


def emitter(body: Mapping[str, Any]) -> Emit:
    def emit(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)  # type: ignore[arg-type]
    return emit


async def _parse_or_fail(rt: Runtime, body: Mapping[str, Any], emit: Emit) -> InferenceServiceSpec | None:
    try:
        return parse_spec(body, rt.config.hub_endpoint)
    except SpecError as e:
        meta = body["metadata"]
        old = body.get("status") or {}
        status = failed_status(str(e), old, meta.get("generation"))
        if not is_subset(status, old):  # report once per spec, not once per event
            await rt.kube.patch("InferenceService", meta["namespace"], meta["name"], {"status": status}, subresource="status")
            emit("Warning", "InvalidSpec", str(e))
        return None


async def run_reconcile(rt: Runtime, body: Mapping[str, Any], *, permanent_on_invalid: bool) -> None:
    if rt.closed:
        return
    emit = emitter(body)
    spec = await _parse_or_fail(rt, body, emit)
    if spec is None:
        if permanent_on_invalid:
            raise kopf.PermanentError("invalid InferenceService spec; see status.conditions")
        return
    try:
        seen = await reconcile(rt, spec, emit)
    except (KubeError, RouterError) as e:
        emit("Warning", "ReconcileFailed", str(e)[:500])
        raise kopf.TemporaryError(str(e), delay=rt.config.retry_delay_seconds) from e
    if seen.router_errors:
        raise kopf.TemporaryError("; ".join(seen.router_errors), delay=rt.config.retry_delay_seconds)


def _wants_autoscaler(spec: Mapping[str, Any], **_: Any) -> bool:
    scaling = spec.get("autoscaling")
    return bool(scaling) and not scaling.get("external", False)


def build_registry(rt: Runtime) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.INFO  # Normal events (registrations) reach the API too
        settings.persistence.finalizer = f"{names.GROUP}/operator"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=names.GROUP)
        settings.watching.server_timeout = 300

    @kopf.on.login(registry=registry)
    async def login(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
        if rt.config.server:
            info: kopf.ConnectionInfo | None = kopf.ConnectionInfo(server=rt.config.server, insecure=True)
        else:
            info = kopf.login_with_service_account(settings=settings, **kwargs) or kopf.login_with_kubeconfig(settings=settings, **kwargs)
        if info is not None:
            rt.set_credentials(Credentials.from_connection_info(info))
        return info

    @kopf.on.resume(**ISVC, registry=registry)
    @kopf.on.create(**ISVC, registry=registry)
    @kopf.on.update(**ISVC, registry=registry)
    async def on_change(body: kopf.Body, **_: Any) -> None:
        await run_reconcile(rt, body, permanent_on_invalid=True)

    @kopf.timer(**ISVC, interval=rt.config.resync_seconds, registry=registry)
    async def resync(body: kopf.Body, **_: Any) -> None:
        """Level-based repair of missed events: pods gone silently, restarted routers."""
        await run_reconcile(rt, body, permanent_on_invalid=False)

    @kopf.on.delete(**ISVC, registry=registry, optional=True)
    async def on_delete(namespace: str, name: str, **_: Any) -> None:
        rt.forget(namespace, name)  # children go with their owner references

    @kopf.on.event("v1", "pods", labels={names.LABEL_MANAGED_BY: names.MANAGED_BY}, registry=registry)
    async def pod_event(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> None:
        """An engine or router pod changed: bring the router lists up to date now."""
        owner = labels.get(names.LABEL_SERVICE)
        if not owner or rt.closed:
            return
        isvc = await rt.kube.get("InferenceService", namespace, owner)
        if isvc is None:
            return
        try:
            spec = parse_spec(isvc, rt.config.hub_endpoint)
        except SpecError:
            return  # reported by the InferenceService handlers
        try:
            if body["metadata"].get("deletionTimestamp"):
                await deregister_terminating(rt, spec, body, emitter(isvc))
            await resync_workers(rt, spec, emitter(isvc))
        except (KubeError, RouterError) as e:
            log.warning("worker sync for %s/%s failed: %s (the resync timer retries)", namespace, owner, e)

    @kopf.timer(**ISVC, interval=rt.config.autoscale_interval_seconds, when=_wants_autoscaler, registry=registry)
    async def autoscale(body: kopf.Body, **_: Any) -> None:
        if rt.closed:
            return
        spec = parse_spec(body, rt.config.hub_endpoint)
        scaling = spec.autoscaling
        assert scaling is not None and not scaling.external, "filtered by _wants_autoscaler"
        workers = ready_workers(spec, await list_pods(rt, spec))
        value = await observe(workers, scaling.metric, await rt.api_key(spec))
        if value is None and spec.replicas:
            return  # no data: never scale on silence
        rec = recommend(spec.replicas, value or 0.0, scaling)
        history = rt.scale_history.setdefault((spec.namespace, spec.name), ScaleHistory())
        want = stabilize(history, spec.replicas, rec, time.monotonic(), scaling.scale_down_stabilization_seconds)
        if want != spec.replicas:
            await rt.kube.patch("InferenceService", spec.namespace, spec.name, {"spec": {"replicas": want}})
            kopf.event(body, type="Normal", reason="Autoscaled",
                       message=f"replicas {spec.replicas} -> {want} ({scaling.metric} per replica {value:.2f}, target {scaling.target})")

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        # Timers are not cancelled on exit: let a running reconcile finish its writes first.
        rt.closed = True
        for lock in list(rt.locks.values()):
            try:
                await asyncio.wait_for(lock.acquire(), timeout=10)
            except asyncio.TimeoutError:
                log.warning("a reconcile is still running at shutdown")
        if rt.api is not None:
            await rt.api.close()

    return registry
