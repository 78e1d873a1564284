"""Forwarding one request: choose a worker, send, retry elsewhere on failure, relay back.

Accounting invariant: ``Proxy.in_flight`` and ``worker.in_flight`` are incremented when a
request is admitted / dispatched and decremented exactly once when its answer is complete —
for a stream, when the last chunk is relayed or the client disconnects (``_Release``).

Retry rule: connection errors and upstream 5xx are failures, retried on another worker up
to ``max_total_retries`` times, and for streams only before the first byte reaches the
client. Upstream 4xx are the client's problem and are passed back unchanged.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .admission import Admission, Refusal
from .config import RouterConfig
from .metrics import RouterMetrics
from .policies.base import Policy
from .registry import WorkerRegistry
from .upstream import Upstream, UpstreamError, UpstreamResponse
from .worker import Worker

try:  # optional speedup: parse request bodies with orjson when it is installed
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads

log = logging.getLogger(__name__)

Selector = Callable[[Sequence[Worker], str], tuple[Worker, str]]

WORKER_HEADER = "x-radixfleet-worker"  # on every proxied answer: the worker that gave it
# On an answer routed precisely by the events: the cached prompt tokens predicted (whole blocks).
PREDICTED_HEADER = "x-radixfleet-predicted-cached-tokens"
_CACHED_TOKENS = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')


def error_response(status: int, message: str, retry_after: int | None = None) -> Response:
    """An OpenAI-style JSON error the router answers itself."""
    body = json.dumps({"error": {"message": message, "type": "router_error", "code": status}})
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def requested_tokens(text: str, body: Any) -> int:
    """What a request costs a per-key token bucket: its prompt tokens (counted by the precise
    policy's tokenizer, else characters / 4) plus the output tokens it asks for."""
    ids = getattr(text, "ids", None)
    n = len(ids) if ids else len(text) // 4
    if isinstance(body, dict):
        params = body.get("sampling_params")
        for asked in (body.get("max_completion_tokens"), body.get("max_tokens"),
                      params.get("max_new_tokens") if isinstance(params, dict) else None):
            if isinstance(asked, int) and asked > 0:
                return n + asked
    return n


def least_loaded(candidates: Sequence[Worker], text: str) -> tuple[Worker, str]:
    return min(candidates, key=lambda w: w.in_flight), ""


class _Release:
    """Runs the end-of-request bookkeeping once, however the stream ends."""

    __slots__ = ("_fn", "_done")

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn
        self._done = False

    def __call__(self) -> None:
        if not self._done:
            self._done = True
            self._fn()


class _Prefill:
    """The uncached prompt tokens (precise policy's estimate) a worker owes a request until
    its answer starts: counted in ``worker.pending_prefill`` once, settled once; and the
    request's prompt ids in ``worker.prompts_in_flight`` until the request is done."""

    __slots__ = ("worker", "tokens")

    def __init__(self, worker: Worker, tokens: int, ids: Sequence[int] | None = None) -> None:
        self.worker, self.tokens = worker, tokens
        worker.pending_prefill += tokens
        if ids:
            worker.prompts_in_flight[id(self)] = ids

    def resize(self, tokens: int) -> None:
        self.worker.pending_prefill += tokens - self.tokens
        self.tokens = tokens

    def settle(self) -> None:
        self.resize(0)

    def done(self) -> None:
        self.settle()
        self.worker.prompts_in_flight.pop(id(self), None)


class _RelayResponse(StreamingResponse):
    """A StreamingResponse that closes its upstream even when the client goes away."""

    def __init__(self, upstream: UpstreamResponse, chunks: AsyncIterator[bytes], release: _Release,
                 headers: dict[str, str]) -> None:
        super().__init__(chunks, status_code=upstream.status, media_type=upstream.content_type, headers=headers)
        self._upstream = upstream
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._upstream.close()
            self._release()


class Proxy:
    """Sends requests to workers for the HTTP routes of the app."""

    def __init__(self, config: RouterConfig, registry: WorkerRegistry, policy: Policy,
                 metrics: RouterMetrics, upstream: Upstream, admission: Admission | None = None) -> None:
        self.config = config
        self.registry = registry
        self.policy = policy
        self.metrics = metrics
        self.upstream = upstream
        self.admission = admission or Admission(config)
        self.in_flight = 0
        self.headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if config.worker_api_key:
            self.headers["authorization"] = f"Bearer {config.worker_api_key}"

    async def forward(self, request: Request, route: str) -> Response:
        """Proxy a POST with a JSON body to the worker the policy picks, once admitted
        (``admission.py``: per-key limits, then a slot)."""
        body = await request.body()
        try:
            parsed = _loads(body) if body else None
        except ValueError:
            parsed = None  # let the worker answer its own 400
        text = self.policy.routing_key(route, parsed)
        stream = isinstance(parsed, dict) and parsed.get("stream") is True
        refusal = self.admission.check_rate(request.headers.get("authorization"), requested_tokens(text, parsed))
        if refusal is None:
            refusal, waited = await self.admission.acquire(request.receive)
            if waited or refusal is not None:
                outcome = "admitted" if refusal is None else "cancelled" if refusal.status == 499 else "timeout"
                self.metrics.queue_wait.labels(outcome).observe(waited)
        if refusal is not None:
            return self._refuse(route, refusal)
        return await self._send("POST", route, body, text, stream, self.policy.select, slot=True)

    async def forward_get(self, route: str) -> Response:
        """Proxy a GET (model info and the like) to the least-loaded available worker."""
        return await self._send("GET", route, None, "", False, least_loaded)

    async def _send(self, method: str, route: str, body: bytes | None, text: str, stream: bool,
                    select: Selector, slot: bool = False) -> Response:
        start = time.perf_counter()
        self.in_flight += 1
        worker: Worker | None = None
        prefill: _Prefill | None = None

        def release() -> None:
            if prefill is not None:
                prefill.done()
            self.in_flight -= 1
            if worker is not None:
                worker.in_flight -= 1
            took = time.perf_counter() - start
            if slot:
                self.admission.release(took)
            self.metrics.request_duration.labels(route).observe(took)

        releaser = _Release(release)
        try:
            tried: set[str] = set()
            last_error = ""
            for attempt in range(self.config.max_total_retries + 1):
                candidates = self.registry.candidates(tried) or self.registry.candidates(set())
                if not candidates:
                    if attempt == 0:
                        return self._reject(route, 503, "no_workers", "No available workers: the router has no healthy workers registered")
                    break
                if attempt:
                    self.metrics.retries.labels(route).inc()
                t0 = time.perf_counter()
                worker, decision = select(candidates, text)
                took = time.perf_counter() - t0
                decided = self.policy.decided_by() if decision else self.policy.name
                self.metrics.routing_latency.labels(decided).observe(took)
                if decision:
                    self.metrics.decisions_by_policy.labels(decided, decision).inc()
                    if decided == "cache_aware":
                        self.metrics.decisions.labels(decision).inc()
                tried.add(worker.url)
                worker.in_flight += 1
                worker.breaker.on_dispatch()
                # Counted before any wait, so that the next request routed meanwhile sees this one.
                prefill = _Prefill(worker, getattr(text, "uncached", 0), getattr(text, "ids", None))
                if select == self.policy.select:
                    await self.policy.before_send(worker, text)
                    prefill.resize(getattr(text, "uncached", 0))
                last = attempt == self.config.max_total_retries
                try:
                    upstream = await self.upstream.send(method, worker.url + route, body, self.headers, stream=stream)
                except UpstreamError as e:
                    prefill.done()
                    last_error = f"{worker.url}: {e}"
                    self._failed(worker, route, "connect" if e.counts_against_worker else "disconnect",
                                 last_error, e.counts_against_worker)
                    worker = None
                    continue
                if not stream or upstream.status >= 500:
                    prefill.settle()
                if upstream.status >= 500 and not last:
                    prefill.done()
                    upstream.close()
                    last_error = f"{worker.url}: HTTP {upstream.status}"
                    self._failed(worker, route, "status_5xx", last_error, True)
                    worker = None
                    continue
                if stream and upstream.status < 500:
                    # Wait for the first chunk: until it has been relayed, a failure is retried.
                    chunks = upstream.chunks()
                    try:
                        first = await anext(chunks, b"")
                    except UpstreamError as e:
                        prefill.done()
                        upstream.close()
                        last_error = f"{worker.url}: {e} before the first byte"
                        self._failed(worker, route, "stream", last_error, e.counts_against_worker)
                        worker = None
                        continue
                    prefill.settle()  # the first token is out: its prefill is done
                self.metrics.requests.labels(route, worker.url, str(upstream.status)).inc()
                if upstream.status >= 500:  # out of retries: pass the last answer back
                    self.metrics.worker_failures.labels(worker.url, "status_5xx").inc()
                    self.registry.record_failure(worker)
                    if stream:
                        try:
                            await upstream.read()
                        finally:
                            upstream.close()
                        stream = False
                else:
                    self.registry.record_success(worker)
                predicted = getattr(text, "predicted", None)
                headers = {WORKER_HEADER: worker.url}
                if predicted is not None:
                    headers[PREDICTED_HEADER] = str(predicted)
                if stream:
                    relay = self._relay(first, chunks, upstream, worker, releaser, predicted)
                    response = _RelayResponse(upstream, relay, releaser, headers)
                    releaser = None  # the response owns the release now
                    return response
                if predicted is not None and upstream.status == 200:
                    self._compare_cached(worker, predicted, upstream.content)
                return Response(upstream.content, status_code=upstream.status, media_type=upstream.content_type,
                                headers=headers)
            return self._reject(route, 502, "retries_exhausted",
                                f"All {len(tried)} tried workers failed after {self.config.max_total_retries} retries; last error: {last_error}")
        finally:
            if releaser is not None:
                releaser()

    async def _relay(self, first: bytes, chunks: AsyncIterator[bytes], upstream: UpstreamResponse, worker: Worker,
                     release: _Release, predicted: int | None = None) -> AsyncIterator[bytes]:
        last_usage = b""
        try:
            if first:
                yield first
                if predicted is not None and b'"cached_tokens"' in first:
                    last_usage = first
            async for chunk in chunks:
                if predicted is not None and b'"cached_tokens"' in chunk:
                    last_usage = chunk
                yield chunk
            if last_usage and upstream.status == 200:
                self._compare_cached(worker, predicted, last_usage)
        except UpstreamError as e:  # after the first byte: too late to retry, end the stream
            log.warning("stream from %s broke off: %s", worker.url, e)
            self.metrics.worker_failures.labels(worker.url, "stream").inc()
            self.registry.record_failure(worker)
        finally:
            upstream.close()
            release()

    def _compare_cached(self, worker: Worker, predicted: int | None, content: bytes) -> None:
        """Count a precise prediction against the ``cached_tokens`` the worker reported (the
        last one in ``content``), both in whole blocks of the worker's KV events."""
        found = _CACHED_TOKENS.findall(content)
        if predicted is None or not found:
            return
        reported = int(found[-1])
        block = self.block_size(worker.url)
        self.metrics.predicted_cached.inc(predicted)
        self.metrics.reported_cached.inc(reported)
        aligned = reported // block * block
        self.metrics.predictions.labels("exact" if aligned == predicted else "over" if predicted > aligned
                                        else "under").inc()

    def block_size(self, url: str) -> int:
        index = getattr(self.policy, "index", None)
        w = index.workers.get(url) if index is not None else None
        return w.block_size if w is not None else 1

    def _failed(self, worker: Worker, route: str, reason: str, detail: str, counts: bool) -> None:
        """An attempt failed before any byte reached the client; the caller retries."""
        worker.in_flight -= 1
        log.warning("attempt on %s%s failed: %s", worker.url, route, detail)
        self.metrics.worker_failures.labels(worker.url, reason).inc()
        if counts:
            self.registry.record_failure(worker)

    def _refuse(self, route: str, refusal: Refusal) -> Response:
        self.metrics.rejected.labels(route, refusal.reason).inc()
        self.metrics.requests.labels(route, "none", str(refusal.status)).inc()
        return error_response(refusal.status, refusal.message, refusal.retry_after)

    def _reject(self, route: str, status: int, reason: str, message: str) -> Response:
        self.metrics.rejected.labels(route, reason).inc()
        self.metrics.requests.labels(route, "none", str(status)).inc()
        return error_response(status, message)
