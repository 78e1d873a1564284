"""Membership routes: SGLang's ``/add_worker``, ``/remove_worker``, ``/list_workers`` (plain
text answers, as in its docs) and the REST ``/workers`` resource (JSON)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .health import wait_healthy
from .registry import DuplicateWorker, UnknownWorker, WorkerRegistry
from .upstream import Upstream
from .worker import InvalidWorkerURL, normalize_url

log = logging.getLogger(__name__)


class Membership:
    """Adds and removes workers; adding waits until the worker's /health answers 200."""

    def __init__(self, registry: WorkerRegistry, upstream: Upstream, headers: dict[str, str]) -> None:
        self.registry = registry
        self.upstream = upstream
        self.headers = headers
        self._pending: set[str] = set()  # URLs being added (waiting for health)
        # Set by the app when the policy follows KV events: called once a worker is added,
        # with its event endpoint if one was given (kv_subscriber.py).
        self.on_added: Callable[[str, str | None], Awaitable[None]] | None = None
        self.check_events: Callable[[str], str] = lambda endpoint: endpoint
        self._background: set[asyncio.Task] = set()

    async def add(self, raw_url: str | None, events: str | None = None) -> tuple[int, str]:
        """(HTTP status, message) for adding ``raw_url`` (``events``: its KV-event endpoint)."""
        if not raw_url:
            return 400, "Missing url parameter, e.g. /add_worker?url=http://127.0.0.1:30001"
        try:
            url = normalize_url(raw_url)
            if events:
                events = self.check_events(events)
        except (InvalidWorkerURL, ValueError) as e:
            return 400, str(e)
        if url in self.registry or url in self._pending:
            return 409, f"Worker already exists: {url}"
        config = self.registry.config
        self._pending.add(url)
        try:
            ok, reason = await wait_healthy(self.upstream, url, config.worker_startup_timeout,
                                            config.health_check_timeout, self.headers)
        finally:
            self._pending.discard(url)
        if not ok:
            return 400, f"Worker {url} is not healthy after {config.worker_startup_timeout:g} s: {reason}"
        try:
            self.registry.add(url)
        except DuplicateWorker as e:
            return 409, str(e)
        if self.on_added is not None:  # in the background: the answer does not wait for it
            task = asyncio.create_task(self.on_added(url, events or None))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return 200, f"Successfully added worker: {url}"

    def remove(self, raw_url: str | None) -> tuple[int, str]:
        if not raw_url:
            return 400, "Missing url parameter, e.g. /remove_worker?url=http://127.0.0.1:30001"
        try:
            worker = self.registry.remove(raw_url, reason="api")
        except UnknownWorker as e:
            return 404, e.args[0]
        return 200, f"Successfully removed worker: {worker.url}"

    def add_in_background(self, urls: list[str]) -> list[asyncio.Task]:
        """Add the startup ``--worker-urls`` as each becomes healthy, without blocking startup."""

        async def one(url: str) -> None:
            status, message = await self.add(url)
            (log.info if status == 200 else log.error)("%s", message)

        return [asyncio.create_task(one(u)) for u in urls]

    def describe(self) -> list[dict]:
        return [
            {"url": w.url, "in_flight": w.in_flight, "pending_prefill": w.pending_prefill,
             "prompts_in_flight": len(w.prompts_in_flight), "healthy": w.healthy,
             "circuit": w.breaker.state.name.lower(), "consecutive_failures": w.consecutive_failures}
            for w in self.registry.workers()
        ]


def membership_routes(members: Membership) -> APIRouter:
    router = APIRouter()

    @router.post("/add_worker")
    async def add_worker(url: str | None = None, kv_events: str | None = None) -> Response:
        status, message = await members.add(url, kv_events)
        return PlainTextResponse(message, status_code=status)

    @router.post("/remove_worker")
    async def remove_worker(url: str | None = None) -> Response:
        status, message = members.remove(url)
        return PlainTextResponse(message, status_code=status)

    @router.get("/list_workers")
    async def list_workers() -> Response:
        return JSONResponse({"urls": members.registry.urls()})

    @router.get("/workers")
    async def get_workers() -> Response:
        return JSONResponse({"workers": members.describe()})

    @router.post("/workers")
    async def post_worker(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        url = body.get("url") if isinstance(body, dict) else None
        events = body.get("kv_events") if isinstance(body, dict) else None
        if not isinstance(url, str) or not isinstance(events, str | None):
            return JSONResponse({"error": 'Expected a JSON body {"url": "http://host:port"} '
                                          '(and optionally "kv_events": "tcp://host:port")'}, status_code=400)
        status, message = await members.add(url, events)
        return _rest_answer(status, message, url)

    @router.delete("/workers/{url:path}")
    async def delete_worker(url: str) -> Response:
        status, message = members.remove(url)
        return _rest_answer(status, message, url)

    return router


def _rest_answer(status: int, message: str, url: str) -> Response:
    key = "message" if status == 200 else "error"
    return JSONResponse({key: message, "url": url.rstrip("/")}, status_code=status)
