"""The router in front of real fake workers on loopback: membership, proxying, streaming,
auth, queue limit, metrics. Every assertion is about what an HTTP client sees."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from router_harness import RouterThread, free_port, start_fake_workers

from radixfleet.router.config import RouterConfig
from radixfleet.router.metric_names import ROUTER_METRICS

CHUNKS, CHUNK_INTERVAL = 5, 0.1


@pytest.fixture(scope="module")
def workers():
    ws = start_fake_workers(3, latency=0.002, chunks=CHUNKS, chunk_interval=CHUNK_INTERVAL)
    yield ws
    for w in ws:
        w.kill()


def router(*urls: str, **kw) -> RouterThread:
    kw.setdefault("worker_startup_timeout", 1.0)
    return RouterThread(RouterConfig(port=free_port(), worker_urls=tuple(urls), **kw))


def client(**kw) -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=10.0, **kw)


async def wait_for_workers(c: httpx.AsyncClient, base: str, n: int) -> None:
    for _ in range(100):
        if len((await c.get(base + "/list_workers")).json()["urls"]) == n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"router never had {n} workers")


async def test_membership_routes_answer_like_sglang(workers):
    w0, w1 = workers[0].url, workers[1].url
    with router() as r:
        async with client() as c:
            assert (await c.get(r.url + "/list_workers")).json() == {"urls": []}
            resp = await c.post(r.url + "/add_worker", params={"url": w0})
            assert (resp.status_code, resp.text) == (200, f"Successfully added worker: {w0}")
            resp = await c.post(r.url + "/add_worker", params={"url": w0 + "/"})
            assert (resp.status_code, resp.text) == (409, f"Worker already exists: {w0}")
            resp = await c.post(r.url + "/add_worker", params={"url": "not-a-url"})
            assert resp.status_code == 400 and "Invalid worker URL" in resp.text
            resp = await c.post(r.url + "/add_worker")
            assert resp.status_code == 400 and "Missing url" in resp.text
            dead = f"http://127.0.0.1:{free_port()}"
            resp = await c.post(r.url + "/add_worker", params={"url": dead})
            assert resp.status_code == 400 and "not healthy" in resp.text
            resp = await c.post(r.url + "/workers", json={"url": w1})
            assert resp.status_code == 200 and resp.json()["url"] == w1
            assert (await c.get(r.url + "/list_workers")).json() == {"urls": [w0, w1]}
            described = (await c.get(r.url + "/workers")).json()["workers"]
            assert [d["url"] for d in described] == [w0, w1] and described[0]["circuit"] == "closed"
            resp = await c.post(r.url + "/remove_worker", params={"url": w0})
            assert (resp.status_code, resp.text) == (200, f"Successfully removed worker: {w0}")
            resp = await c.post(r.url + "/remove_worker", params={"url": w0})
            assert (resp.status_code, resp.text) == (404, f"Worker not found: {w0}")
            resp = await c.delete(r.url + "/workers/" + w1)
            assert resp.status_code == 200 and resp.json()["message"] == f"Successfully removed worker: {w1}"
            assert (await c.get(r.url + "/list_workers")).json() == {"urls": []}


async def test_zero_workers_answers_503_with_a_reason():
    with router() as r:
        async with client() as c:
            resp = await c.post(r.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 503
            assert "No available workers" in resp.json()["error"]["message"]
            assert (await c.get(r.url + "/health")).status_code == 200


async def test_api_key_guards_every_route_but_health(workers):
    # Regression: the pure-ASGI fast path for proxied routes was once mounted outside the
    # auth middleware, so /generate answered 200 without a key.
    with router(workers[0].url, api_key="sekret") as r:
        async with client() as c:
            assert (await c.get(r.url + "/health")).status_code == 200
            for method, path in (("POST", "/generate"), ("GET", "/metrics"), ("GET", "/list_workers"),
                                 ("POST", "/add_worker"), ("GET", "/v1/models")):
                resp = await c.request(method, r.url + path, json={"text": "x"})
                assert resp.status_code == 401, path
            resp = await c.post(r.url + "/generate", json={"text": "x"}, headers={"authorization": "Bearer wrong"})
            assert resp.status_code == 401 and "invalid API key" in resp.text
        async with client(headers={"authorization": "Bearer sekret"}) as c:
            await wait_for_workers(c, r.url, 1)
            resp = await c.post(r.url + "/generate", json={"text": "x"})
            assert resp.status_code == 200 and resp.json()["worker"] == "w0"


async def test_every_route_is_proxied(workers):
    with router(*(w.url for w in workers)) as r:
        async with client() as c:
            await wait_for_workers(c, r.url, 3)
            for path, body in (("/generate", {"text": "t"}), ("/v1/completions", {"prompt": "p"}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "c"}]}),
                               ("/v1/embeddings", {"input": "e"})):
                resp = await c.post(r.url + path, json=body)
                assert resp.status_code == 200 and resp.json()["worker"] in {"w0", "w1", "w2"}, path
            for path in ("/v1/models", "/get_model_info", "/get_server_info"):
                assert (await c.get(r.url + path)).json()["worker"] in {"w0", "w1", "w2"}
            before = [w.stats()["flushes"] for w in workers]
            resp = await c.post(r.url + "/flush_cache")
            assert resp.status_code == 200 and len(resp.json()["flushed"]) == 3
            assert [w.stats()["flushes"] for w in workers] == [b + 1 for b in before]


async def test_upstream_4xx_is_passed_back_unchanged_without_retry(workers):
    with router(workers[0].url, workers[1].url, policy="round_robin") as r:
        async with client() as c:
            await wait_for_workers(c, r.url, 2)
            resp = await c.post(r.url + "/generate", json={"text": "x", "fake_status": 422})
            assert resp.status_code == 422 and resp.json()["error"]["message"].startswith("fake status from")
            metrics = (await c.get(r.url + "/metrics")).text
            assert "radixfleet_router_retries_total{" not in metrics


async def test_upstream_5xx_is_retried_on_another_worker(workers):
    with router(workers[0].url, workers[1].url, policy="round_robin") as r:
        async with client() as c:
            await wait_for_workers(c, r.url, 2)
            for w in workers[:2]:
                await c.post(w.url + "/_fake/fail", params={"status": 500, "count": 1})
            for _ in range(4):
                assert (await c.post(r.url + "/generate", json={"text": "x"})).status_code == 200
            metrics = (await c.get(r.url + "/metrics")).text
            assert 'radixfleet_router_retries_total{route="/generate"} 2.0' in metrics


async def test_streaming_is_relayed_chunk_by_chunk(workers):
    with router(workers[0].url) as r:
        async with client() as c:
            await wait_for_workers(c, r.url, 1)
            start = time.monotonic()
            arrivals = []
            async with c.stream("POST", r.url + "/v1/completions", json={"prompt": "p", "stream": True}) as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/event-stream")
                async for chunk in resp.aiter_raw():
                    arrivals.append((time.monotonic() - start, chunk))
            total = arrivals[-1][0]
            assert b"".join(c for _, c in arrivals).count(b"data: ") == CHUNKS + 1
            # the first chunk reached us long before the worker finished its stream
            assert arrivals[0][0] < total - (CHUNKS - 2) * CHUNK_INTERVAL
            assert len(arrivals) >= CHUNKS  # not buffered into one body
            state = r.state
            assert state.proxy.in_flight == 0 and all(w.in_flight == 0 for w in state.registry.workers())


async def test_client_disconnect_mid_stream_releases_in_flight(workers):
    with router(workers[0].url) as r:
        async with client() as c:
            await wait_for_workers(c, r.url, 1)
            async with c.stream("POST", r.url + "/generate", json={"text": "p", "stream": True}) as resp:
                async for _ in resp.aiter_raw():
                    break  # hang up after the first chunk
            for _ in range(50):
                if r.state.proxy.in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            assert r.state.proxy.in_flight == 0
            assert r.state.registry.workers()[0].in_flight == 0


async def test_queue_limit_answers_429(workers):
    with router(workers[0].url, queue_limit=2, max_waiting=0) as r:
        async with client() as c:
            await wait_for_workers(c, r.url, 1)

            async def stream_one() -> int:
                async with c.stream("POST", r.url + "/generate", json={"text": "p", "stream": True}) as resp:
                    await resp.aread()
                    return resp.status_code

            streams = [asyncio.create_task(stream_one()) for _ in range(2)]
            await asyncio.sleep(0.15)  # both streams are in flight now
            resp = await c.post(r.url + "/generate", json={"text": "x"})
            assert resp.status_code == 429 and "queue limit" in resp.json()["error"]["message"]
            assert await asyncio.gather(*streams) == [200, 200]
            assert (await c.post(r.url + "/generate", json={"text": "x"})).status_code == 200


async def test_removed_worker_receives_nothing_more(workers):
    with router(*(w.url for w in workers[:2]), policy="round_robin") as r:
        async with client() as c:
            await wait_for_workers(c, r.url, 2)
            await c.post(r.url + "/remove_worker", params={"url": workers[1].url})
            served_before = workers[1].stats()["served"]
            results = await asyncio.gather(*(c.post(r.url + "/generate", json={"text": f"q{i}"}) for i in range(20)))
            assert {resp.json()["worker"] for resp in results} == {"w0"}
            assert workers[1].stats()["served"] == served_before


async def test_metrics_exposes_the_catalog(workers):
    with router(workers[0].url, workers[1].url) as r:
        async with client() as c:
            await wait_for_workers(c, r.url, 2)
            for i in range(4):
                await c.post(r.url + "/generate", json={"text": "same prefix " * 20 + str(i)})
            resp = await c.get(r.url + "/metrics")
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
            text = resp.text
            for family in ROUTER_METRICS:
                assert f"# TYPE {family.name.removesuffix('_total')}" in text, family.name
            w0 = workers[0].url
            assert 'radixfleet_router_cache_aware_decisions_total{decision="hit"} 3.0' in text
            assert f'radixfleet_router_in_flight_requests{{worker="{w0}"}} 0.0' in text
            assert f'radixfleet_router_worker_healthy{{worker="{w0}"}} 1.0' in text
            assert "radixfleet_router_workers 2.0" in text
            assert 'radixfleet_router_routing_latency_seconds_count{policy="cache_aware"} 4.0' in text
            served = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith('radixfleet_router_requests_total{route="/generate",status="200"'))
            assert served == 4.0


async def test_worker_api_key_is_sent_upstream():
    (worker,) = start_fake_workers(1, api_key="upstream-key")
    try:
        with router(worker.url, worker_api_key="upstream-key") as r, router(worker.url) as keyless:
            async with client() as c:
                await wait_for_workers(c, r.url, 1)
                await wait_for_workers(c, keyless.url, 1)
                resp = await c.post(r.url + "/generate", json={"text": "x"})
                assert resp.status_code == 200 and resp.json()["worker"] == "w0"
                resp = await c.post(keyless.url + "/generate", json={"text": "x"})
                assert resp.status_code == 401 and "bad or missing API key" in resp.text  # passed back as is
    finally:
        worker.kill()


async def test_removing_a_worker_lets_its_in_flight_stream_finish(workers):
    with router(workers[2].url) as r:
        async with client() as c:
            await wait_for_workers(c, r.url, 1)
            async with c.stream("POST", r.url + "/generate", json={"text": "p", "stream": True}) as resp:
                chunks = resp.aiter_raw()
                first = await chunks.__anext__()
                removed = await c.post(r.url + "/remove_worker", params={"url": workers[2].url})
                assert removed.status_code == 200
                rest = b"".join([chunk async for chunk in chunks])
            assert (first + rest).count(b"data: ") == CHUNKS + 1 and rest.endswith(b"data: [DONE]\n\n")
            assert r.state.proxy.in_flight == 0
            resp = await c.post(r.url + "/generate", json={"text": "x"})
            assert resp.status_code == 503
