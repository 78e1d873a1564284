"""Fault tolerance with real worker processes: a worker killed mid-run costs no failed
request, a worker whose /health fails is removed, an open circuit sheds traffic."""

from __future__ import annotations

import asyncio

import httpx
from router_harness import RouterThread, free_port, start_fake_workers

from radixfleet.router.config import RouterConfig


def router(*urls: str, **kw) -> RouterThread:
    return RouterThread(RouterConfig(port=free_port(), worker_urls=tuple(urls), worker_startup_timeout=5.0, **kw))


async def wait_for_workers(c: httpx.AsyncClient, base: str, n: int, timeout: float = 10.0) -> list[str]:
    for _ in range(int(timeout / 0.05)):
        urls = (await c.get(base + "/list_workers")).json()["urls"]
        if len(urls) == n:
            return urls
        await asyncio.sleep(0.05)
    raise AssertionError(f"router never had {n} workers, has {urls}")


async def test_worker_killed_mid_run_costs_no_failed_request():
    workers = start_fake_workers(3, latency=0.01)
    try:
        with router(*(w.url for w in workers), policy="round_robin", health_check_interval=0.5) as r:
            async with httpx.AsyncClient(trust_env=False, timeout=30.0) as c:
                await wait_for_workers(c, r.url, 3)
                sem = asyncio.Semaphore(8)
                done = 0

                async def one(i: int) -> int:
                    nonlocal done
                    async with sem:
                        resp = await c.post(r.url + "/v1/chat/completions",
                                            json={"messages": [{"role": "user", "content": f"question {i}"}]})
                        done += 1
                        if done == 60:
                            workers[1].kill()  # mid-run, with requests in flight to it
                        return resp.status_code

                statuses = await asyncio.gather(*(one(i) for i in range(300)))
                assert statuses.count(200) == 300, {s: statuses.count(s) for s in set(statuses)}
                urls = await wait_for_workers(c, r.url, 2)
                assert workers[1].url not in urls
                metrics = (await c.get(r.url + "/metrics")).text
                assert 'radixfleet_router_worker_removals_total{reason="failures"} 1.0' in metrics
    finally:
        for w in workers:
            w.kill()


async def test_failing_health_checks_remove_the_worker_after_max_worker_retries():
    workers = start_fake_workers(2)
    try:
        with router(*(w.url for w in workers), health_check_interval=0.2, max_worker_retries=3) as r:
            async with httpx.AsyncClient(trust_env=False, timeout=10.0) as c:
                await wait_for_workers(c, r.url, 2)
                await c.post(workers[0].url + "/_fake/health", params={"ok": 0})
                urls = await wait_for_workers(c, r.url, 1, timeout=5.0)
                assert urls == [workers[1].url]
                resp = await c.post(r.url + "/generate", json={"text": "still served"})
                assert resp.status_code == 200 and resp.json()["worker"] == "w1"
    finally:
        for w in workers:
            w.kill()


async def test_open_circuit_sheds_traffic_then_a_probe_closes_it():
    workers = start_fake_workers(2)
    try:
        with router(*(w.url for w in workers), policy="round_robin", circuit_breaker_failures=2,
                    circuit_breaker_cooldown=0.5, max_worker_retries=5, health_check_interval=60) as r:
            async with httpx.AsyncClient(trust_env=False, timeout=10.0) as c:
                await wait_for_workers(c, r.url, 2)
                await c.post(workers[0].url + "/_fake/fail", params={"status": 503, "count": 2})
                for i in range(4):  # round robin hits w0 twice: both fail over to w1
                    assert (await c.post(r.url + "/generate", json={"text": f"{i}"})).status_code == 200
                state = {w["url"]: w for w in (await c.get(r.url + "/workers")).json()["workers"]}
                assert state[workers[0].url]["circuit"] == "open"
                served = workers[0].stats()["served"]
                for i in range(6):
                    resp = await c.post(r.url + "/generate", json={"text": f"open {i}"})
                    assert resp.json()["worker"] == "w1"
                assert workers[0].stats()["served"] == served
                await asyncio.sleep(0.6)  # cooldown over: half-open, the next request probes w0
                results = [(await c.post(r.url + "/generate", json={"text": f"probe {i}"})).json()["worker"] for i in range(4)]
                assert "w0" in results
                state = {w["url"]: w for w in (await c.get(r.url + "/workers")).json()["workers"]}
                assert state[workers[0].url]["circuit"] == "closed"
    finally:
        for w in workers:
            w.kill()


async def test_all_retries_exhausted_answers_502_with_the_last_error():
    workers = start_fake_workers(1)
    try:
        with router(workers[0].url, max_total_retries=2, max_worker_retries=10) as r:
            async with httpx.AsyncClient(trust_env=False, timeout=10.0) as c:
                await wait_for_workers(c, r.url, 1)
                await c.post(workers[0].url + "/_fake/fail", params={"status": 500, "count": 3})
                resp = await c.post(r.url + "/generate", json={"text": "x"})
                assert resp.status_code == 500  # the last upstream answer, passed back
                assert "injected failure" in resp.text
                metrics = (await c.get(r.url + "/metrics")).text
                assert 'radixfleet_router_retries_total{route="/generate"} 2.0' in metrics
    finally:
        for w in workers:
            w.kill()


async def test_stream_broken_before_the_first_byte_is_retried():
    workers = start_fake_workers(2, chunks=3, chunk_interval=0.01)
    try:
        with router(*(w.url for w in workers), policy="round_robin") as r:
            async with httpx.AsyncClient(trust_env=False, timeout=10.0) as c:
                await wait_for_workers(c, r.url, 2)
                for w in workers:
                    await c.post(w.url + "/_fake/fail", params={"status": 0, "count": 1})
                for i in range(4):
                    async with c.stream("POST", r.url + "/generate", json={"text": f"{i}", "stream": True}) as resp:
                        body = await resp.aread()
                    assert resp.status_code == 200 and body.count(b"data: ") == 4, body
                metrics = (await c.get(r.url + "/metrics")).text
                assert 'radixfleet_router_retries_total{route="/generate"} 2.0' in metrics
    finally:
        for w in workers:
            w.kill()
