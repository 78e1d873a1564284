"""Prefix affinity on a shared-prefix workload: 8 groups of long system prompts.

Under cache_aware each group should stay on one worker (affinity >= 95%); round_robin
scatters every group over all workers. Affinity = share of requests served by their
group's most-used worker.
"""

from __future__ import annotations

import asyncio
import collections
import random

import httpx
import pytest
from router_harness import RouterThread, free_port, start_fake_workers

from radixfleet.router.config import RouterConfig

GROUPS, PER_GROUP, CONCURRENCY = 8, 25, 8


def system_prompt(g: int) -> str:
    rng = random.Random(g)
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"]) for _ in range(300))
    return f"You are assistant number {g}. Follow these rules: {words}"


@pytest.fixture(scope="module")
def workers():
    ws = start_fake_workers(2, latency=0.01)
    yield ws
    for w in ws:
        w.kill()


async def affinity(policy: str, urls: list[str]) -> float:
    with RouterThread(RouterConfig(port=free_port(), worker_urls=tuple(urls), policy=policy)) as r:
        async with httpx.AsyncClient(trust_env=False, timeout=30.0) as c:
            for _ in range(100):
                if len((await c.get(r.url + "/list_workers")).json()["urls"]) == len(urls):
                    break
                await asyncio.sleep(0.05)
            jobs = [(g, i) for i in range(PER_GROUP) for g in range(GROUPS)]
            random.Random(0).shuffle(jobs)
            sem = asyncio.Semaphore(CONCURRENCY)
            served: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)

            async def one(g: int, i: int) -> None:
                messages = [{"role": "system", "content": system_prompt(g)},
                            {"role": "user", "content": f"Question {i}: what is {i} + {g}?"}]
                async with sem:
                    resp = await c.post(r.url + "/v1/chat/completions", json={"messages": messages})
                assert resp.status_code == 200
                served[g][resp.json()["worker"]] += 1

            await asyncio.gather(*(one(g, i) for g, i in jobs))
    return sum(max(cnt.values()) for cnt in served.values()) / len(jobs)


async def test_cache_aware_keeps_each_prefix_group_on_one_worker(workers):
    urls = [w.url for w in workers]
    cache_aware = await affinity("cache_aware", urls)
    round_robin = await affinity("round_robin", urls)
    assert cache_aware >= 0.95, cache_aware
    assert round_robin < 0.8, round_robin
