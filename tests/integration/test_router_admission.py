"""The router's admission control, seen by HTTP clients: a bounded waiting queue with a
timeout (429 when full, 408 on timeout, both with Retry-After), per-key token buckets on
requests and tokens, queue metrics, and a client that disconnects leaving the queue at once.
One real fake worker answering after 0.6 s, the router in this process."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from router_harness import RouterThread, free_port, start_fake_workers

from radixfleet.router.config import RouterConfig

LATENCY = 0.6


@pytest.fixture(scope="module")
def slow_worker():
    (w,) = start_fake_workers(1, latency=LATENCY)
    yield w
    w.kill()


def router(url: str, **kw) -> RouterThread:
    return RouterThread(RouterConfig(port=free_port(), worker_urls=(url,), worker_startup_timeout=5.0, **kw))


async def ready(c: httpx.AsyncClient, base: str) -> None:
    for _ in range(200):
        if (await c.get(base + "/list_workers")).json()["urls"]:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("worker not registered")


def sample(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def post(c: httpx.AsyncClient, base: str, key: str = "", **body):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return c.post(base + "/generate", json={"text": "hello", **body}, headers=headers)


async def test_waiting_requests_are_served_in_turn(slow_worker):
    with router(slow_worker.url, queue_limit=1, max_waiting=4) as r:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
            await ready(c, r.url)
            start = time.monotonic()
            answers = await asyncio.gather(*(post(c, r.url) for _ in range(3)))
            assert [a.status_code for a in answers] == [200, 200, 200]
            assert time.monotonic() - start >= 3 * LATENCY * 0.9  # one at a time: they queued
            metrics = (await c.get(r.url + "/metrics")).text
            assert sample(metrics, 'radixfleet_router_queue_wait_seconds_count{outcome="admitted"}') == 2
            assert sample(metrics, "radixfleet_router_queue_depth") == 0


async def test_full_queue_answers_429_and_timeout_408_with_retry_after(slow_worker):
    with router(slow_worker.url, queue_limit=1, max_waiting=1, queue_timeout=0.2) as r:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
            await ready(c, r.url)
            first = asyncio.create_task(post(c, r.url))
            await asyncio.sleep(0.1)
            waiting = asyncio.create_task(post(c, r.url))
            await asyncio.sleep(0.05)
            full = await post(c, r.url)
            assert full.status_code == 429 and "queue limit" in full.json()["error"]["message"]
            assert int(full.headers["retry-after"]) >= 1
            timed_out = await waiting
            assert timed_out.status_code == 408, timed_out.text
            assert "queue timeout of 0.2 s" in timed_out.json()["error"]["message"]
            assert int(timed_out.headers["retry-after"]) >= 1
            assert (await first).status_code == 200
            metrics = (await c.get(r.url + "/metrics")).text
            assert sample(metrics, 'radixfleet_router_rejected_requests_total{reason="queue_full"') == 1
            assert sample(metrics, 'radixfleet_router_rejected_requests_total{reason="queue_timeout"') == 1
            assert (await post(c, r.url)).status_code == 200  # nothing leaked: the slot is free again


async def test_cancelled_client_leaves_the_queue_at_once(slow_worker):
    with router(slow_worker.url, queue_limit=1, max_waiting=4, queue_timeout=30) as r:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
            await ready(c, r.url)
            first = asyncio.create_task(post(c, r.url))
            await asyncio.sleep(0.1)
            async with httpx.AsyncClient(trust_env=False, timeout=30) as quitter:
                waiting = asyncio.create_task(post(quitter, r.url))
                await asyncio.sleep(0.1)
                assert sample((await c.get(r.url + "/metrics")).text, "radixfleet_router_queue_depth") == 1
                waiting.cancel()  # the client gives up: its connection closes
            left = time.monotonic()
            while sample((await c.get(r.url + "/metrics")).text, "radixfleet_router_queue_depth") != 0:
                assert time.monotonic() - left < 0.3, "the cancelled request is still queued"
                await asyncio.sleep(0.01)
            assert not first.done()  # it left before any slot freed up
            assert (await first).status_code == 200
            metrics = (await c.get(r.url + "/metrics")).text
            assert sample(metrics, 'radixfleet_router_rejected_requests_total{reason="client_cancelled"') == 1
            assert slow_worker.stats()["served"] >= 1
            assert r.state.proxy.admission.used == 0 and r.state.proxy.in_flight == 0


async def test_per_key_request_and_token_limits(slow_worker):
    with router(slow_worker.url, rate_limit_rps=1, rate_limit_burst=2,
                rate_limit_tokens_per_s=50, rate_limit_token_burst=100) as r:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
            await ready(c, r.url)
            a = await asyncio.gather(*(post(c, r.url, "key-a") for _ in range(3)))
            assert sorted(x.status_code for x in a) == [200, 200, 429]
            refused = next(x for x in a if x.status_code == 429)
            assert "1 requests/s" in refused.json()["error"]["message"]
            assert int(refused.headers["retry-after"]) >= 1
            assert "key-a" not in refused.text  # keys never appear in answers
            assert (await post(c, r.url, "key-b")).status_code == 200  # another key, another bucket
            # Tokens: prompt (~characters / 4) plus max_new_tokens.
            assert (await post(c, r.url, "key-c", sampling_params={"max_new_tokens": 90})).status_code == 200
            short = await post(c, r.url, "key-c", sampling_params={"max_new_tokens": 90})
            assert short.status_code == 429 and "50 tokens/s" in short.json()["error"]["message"]
            assert int(short.headers["retry-after"]) >= 1
            huge = await post(c, r.url, "key-d", sampling_params={"max_new_tokens": 500})
            assert huge.status_code == 429 and "more than this key's bucket holds" in huge.json()["error"]["message"]
            metrics = (await c.get(r.url + "/metrics")).text
            assert sample(metrics, 'radixfleet_router_rejected_requests_total{reason="rate_limited"') == 3


def test_bad_admission_settings_are_refused():
    with pytest.raises(ValueError, match="queue_timeout must be > 0"):
        RouterConfig(queue_timeout=0)
    with pytest.raises(ValueError, match="rate limits must be >= 0"):
        RouterConfig(rate_limit_rps=-1)
