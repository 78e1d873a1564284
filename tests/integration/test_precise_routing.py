"""The precise policy end to end: 3 real CPU engines publishing KV events, KV pools small
enough to evict, 3 router processes (replicas) in front of them, and a multi-tenant
workload of interleaved conversations (``tests/routing_workload.py``).

What a user sees: follow-up turns land on the worker holding their history whichever
replica routes them (>= 0.9), the router's predicted cached tokens equal what the engines
report (>= 95 % of requests, in whole blocks), a worker that flushes its cache is followed,
and the router process never imports torch. Figures for every policy, with 1 and 3
replicas and sglang-router, are ``benchmarks/routing_quality.py``'s.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest
from routing_workload import (
    _turn,
    context,
    flush_all,
    metric,
    run_conversations,
    start_engines,
    start_replicas,
    stop_all,
    summarize,
)

POOL = 768  # KV slots per engine


@pytest.fixture(scope="module")
def engines(model_dir):
    engines = start_engines(3, model_dir, POOL)
    yield engines
    stop_all([e.proc for e in engines])


@pytest.fixture
def replicas(engines, model_dir):
    flush_all(engines)
    # Two replicas fetch the tokenizer from the engines (as a router pod without the model
    # does), one reads the model's folder.
    routers = start_replicas("precise", engines, [None, None, model_dir])
    yield [url for url, _ in routers]
    stop_all([p for _, p in routers])


def predictions(replicas: list[str]) -> dict[str, float]:
    return {o: sum(metric(u, "radixfleet_router_cached_tokens_predictions_total", f'outcome="{o}"') for u in replicas)
            for o in ("exact", "over", "under")}


def test_three_replicas_send_follow_ups_to_the_worker_holding_their_history(replicas):
    # 3 short conversations (~215 tokens each at the end) fit in any one pool together:
    # nothing is evicted, so the worker that answered a turn still holds it at the next.
    tenants, turns = 3, 3
    records, elapsed = asyncio.run(run_conversations(replicas, tenants, turns, 50, concurrency=2))
    summary = summarize(records, elapsed)
    assert summary["requests"] == tenants * turns
    assert summary["follow_up_affinity"] >= 0.9, (summary, [(r.tenant, r.turn, r.worker) for r in records])
    assert summary["cached_tokens"] > 0
    outcomes = predictions(replicas)
    assert sum(outcomes.values()) == tenants * turns, outcomes  # every request was scored by events
    assert outcomes["exact"] >= 0.95 * tenants * turns, outcomes
    # Each answer carries its prediction (x-radixfleet-predicted-cached-tokens), in whole blocks.
    assert all(r.predicted is not None and r.predicted % 16 == 0 for r in records), records
    assert sum(r.predicted == r.cached_tokens // 16 * 16 for r in records) == outcomes["exact"], records
    assert sum(metric(u, "radixfleet_router_routing_decisions_total", 'policy="precise"') for u in replicas) == tenants * turns
    for u in replicas:
        assert metric(u, "radixfleet_router_kv_events_in_sync") == 3
        workers = httpx.get(u + "/workers", timeout=5, trust_env=False).json()["workers"]
        assert all(w["in_flight"] == w["pending_prefill"] == w["prompts_in_flight"] == 0 for w in workers), workers


def test_predictions_match_the_engines_under_eviction(replicas):
    tenants, turns = 10, 2
    # Concurrency 2: an eviction between the routing decision and the engine's admission
    # (more likely the more requests compete for 768 slots) turns a prediction into "over".
    records, _ = asyncio.run(run_conversations(replicas, tenants, turns, 100, concurrency=2))
    # The histories outgrew the three pools together: the engines evicted.
    last = {r.tenant: r.prompt_tokens for r in records if r.turn == turns - 1}
    assert sum(last.values()) > 3 * POOL
    outcomes = predictions(replicas)
    assert sum(outcomes.values()) == tenants * turns, outcomes
    assert outcomes["exact"] >= 0.95 * tenants * turns, outcomes


async def send_burst(replicas: list[str], system: str, gap: float, warm_up: bool = False) -> list:
    """Question ``i`` on the context ``system``, ``gap * i`` seconds in, through replica ``i``."""
    async with httpx.AsyncClient(timeout=120, trust_env=False) as c:
        if warm_up:
            await asyncio.gather(*(_turn(c, u, [{"role": "user", "content": "Warm up."}], 1) for u in replicas))

        async def one(i):
            await asyncio.sleep(gap * i)
            messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}]
            return (await _turn(c, replicas[i], messages, 4))[1]
        return await asyncio.gather(*(one(i) for i in range(len(replicas))))


def test_a_burst_through_three_replicas_is_predicted_from_the_engines_queued_events(replicas):
    """One tenant's three questions on a new ~600-token context, sent 0.15 s apart, each
    through another replica: the 2nd and 3rd arrive while the 1st is still being prefilled,
    so no ``stored`` event says anything yet and the replicas that route them never saw the
    1st. The engine's ``queued`` event tells them: all three go to one worker, and the
    replicas predict exactly what the engine reports, the context cached for the 2nd and 3rd
    (the engine holds them back a step for the 1st's prefill)."""
    records = asyncio.run(send_burst(replicas, context(7, 300), 0.15))
    assert len({r.worker for r in records}) == 1, records
    assert records[0].cached_tokens < 16 and all(r.cached_tokens >= 512 for r in records[1:]), records
    assert [r.predicted for r in records] == [r.cached_tokens // 16 * 16 for r in records], records
    assert predictions(replicas)["exact"] == 3
    assert metric(replicas[1], "radixfleet_router_routing_decisions_total", 'decision="cached"') == 1


def test_a_burst_sent_at_once_through_three_replicas_is_predicted_from_their_announcements(replicas):
    """The same, all three sent at once: each is routed before the engine can have reported
    another (its ``queued`` event takes 10-20 ms to come back), and before the replicas'
    announcements to each other (``--peer-port``/``--peers``) arrive. Each holds its request
    ``--peer-hold`` (3 ms, the default) for them, they agree which was first, and the others wait for the
    engine to queue it: predictions equal what the engine reports (without the hold, 2 of 3
    runs here predicted one of the cached ones 0)."""
    # Each replica's first request pays one-time costs (its connection to the engine, the chat
    # template) that would delay it past the others' hold: one request through each first.
    records = asyncio.run(send_burst(replicas, context(8, 300), 0.0, warm_up=True))
    assert len({r.worker for r in records}) == 1, records
    assert sorted(r.cached_tokens >= 512 for r in records) == [False, True, True], records
    assert [r.predicted for r in records] == [r.cached_tokens // 16 * 16 for r in records], records
    heard = [metric(u, "radixfleet_router_peer_routes_total") for u in replicas]
    assert all(n >= 2 for n in heard), heard  # each heard the two others' announcements


def test_a_flushed_worker_is_followed(engines, replicas):
    asyncio.run(run_conversations(replicas[:1], 3, 1, 50, concurrency=3))
    cached = metric(replicas[0], "radixfleet_router_routing_decisions_total", 'decision="cached"')
    flush_all(engines)  # cleared events: no worker holds anything now
    # The same first turns again: the engines really lost them, and the router knows it.
    records, _ = asyncio.run(run_conversations(replicas[:1], 3, 1, 50, concurrency=1))
    assert all(r.cached_tokens < 16 for r in records), records
    assert metric(replicas[0], "radixfleet_router_routing_decisions_total", 'decision="cached"') == cached
    assert metric(replicas[0], "radixfleet_router_cached_tokens_predictions_total", 'outcome="exact"') == 6


def test_router_process_tokenizes_without_torch(model_dir):
    code = ("import sys; from radixfleet.router.app import build_app; from radixfleet.router.config import RouterConfig;"
            f"app = build_app(RouterConfig(policy='precise', tokenizer_path={model_dir!r}));"
            "ids = app.state.router.policy.tokenizer.token_ids('/v1/chat/completions', "
            "{'messages': [{'role': 'user', 'content': 'hi'}]});"
            "assert ids and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
