"""Process-wide operator state shared by the handlers: the API client, one lock per
InferenceService (reconcile, sync and autoscaling never interleave for one object),
what each router had after the last sync, and the autoscalers' histories."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from radixfleet.operator.autoscale import ScaleHistory
from radixfleet.operator.config import OperatorConfig
from radixfleet.operator.kube import Credentials, KubeApi
from radixfleet.operator.registration import RouterMemory
from radixfleet.operator.router_client import RouterClient
from radixfleet.operator.spec import InferenceServiceSpec

Key = tuple[str, str]  # (namespace, name)


@dataclass
class Runtime:
    config: OperatorConfig = field(default_factory=OperatorConfig)
    api: KubeApi | None = None
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    routers: dict[Key, RouterMemory] = field(default_factory=dict)
    scale_history: dict[Key, ScaleHistory] = field(default_factory=dict)
    closed: bool = False  # set at shutdown: kopf may still fire a timer after cleanup

    def set_credentials(self, credentials: Credentials) -> None:
        self.api = KubeApi(credentials)

    @property
    def kube(self) -> KubeApi:
        assert self.api is not None, "no API credentials yet: the login handler has not run"
        return self.api

    def lock(self, spec: InferenceServiceSpec) -> asyncio.Lock:
        return self.locks.setdefault((spec.namespace, spec.name), asyncio.Lock())

    def router_memory(self, spec: InferenceServiceSpec) -> RouterMemory:
        return self.routers.setdefault((spec.namespace, spec.name), {})

    def forget(self, namespace: str, name: str) -> None:
        for table in (self.locks, self.routers, self.scale_history):
            table.pop((namespace, name), None)

    async def api_key(self, spec: InferenceServiceSpec) -> str | None:
        """The service's API key from its apiKeySecret (None without one, or while the
        Secret or its key is missing): routers and engines require it on every call."""
        if spec.api_key_secret is None:
            return None
        secret: dict[str, Any] | None = await self.kube.get("Secret", spec.namespace, spec.api_key_secret.name)
        data = (secret or {}).get("data") or {}
        if spec.api_key_secret.key not in data:
            return None
        return base64.b64decode(data[spec.api_key_secret.key]).decode()

    async def router_clients(self, spec: InferenceServiceSpec) -> Callable[[str], RouterClient]:
        """A factory of router clients carrying the service's API key, if it has one."""
        key = await self.api_key(spec)
        return lambda base: RouterClient(base, api_key=key)
