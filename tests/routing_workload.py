"""Multi-tenant conversations through routers in front of real CPU engines that publish KV
events: the fleet and the workload of ``tests/integration/test_precise_routing.py`` and
``benchmarks/routing_quality.py``.

Each tenant has a long context of its own (a system prompt) and asks ``turns`` questions in
one conversation, each turn resending the whole history (context, questions, answers)
(``run_conversations``), or asks independent questions on that context, several at once
(``run_shared_context``); tenants run interleaved, ``concurrency`` requests at a time, and each request goes to one of
the router replicas: in turn, or (``replica_seed``) one drawn at random with that seed, as
a Kubernetes Service spreads connections. In turn, the requests ``i`` go to replica ``i %
R``, and round_robin routers, each counting its own requests from 0, then send requests
``i`` to worker ``i // R % W`` alike: ``R`` consecutive requests, a tenant's burst among
them, reach one worker, which no deployment does. Per request the record keeps the worker that answered (the
router's ``x-radixfleet-worker`` header; ``""`` for a router that does not send it), the
engine's reported ``cached_tokens``, prompt tokens, time to first token and latency.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from server_process import free_port, wait_ok

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango")


@dataclass
class Engine:
    url: str
    events_port: int
    proc: subprocess.Popen


def start_engines(n: int, model_dir: str, max_total_tokens: int, timeout: float = 240.0,
                  kv_events: bool = True) -> list[Engine]:
    """``n`` ``radixfleet serve`` processes with KV events on (``events_port`` 0 if not), one
    CPU thread each."""
    engines = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for _ in range(n):
        port, events = free_port(), free_port() if kv_events else 0
        cmd = [sys.executable, "-m", "radixfleet.engine.server.serve", "--model-path", model_dir,
               "--host", "127.0.0.1", "--port", str(port), "--max-total-tokens", str(max_total_tokens),
               "--random-seed", "0", "--kv-events-port", str(events)]
        engines.append(Engine(f"http://127.0.0.1:{port}", events, subprocess.Popen(cmd, env=env)))
    try:
        for e in engines:
            wait_ok(e.url + "/health", timeout, e.proc)
    except BaseException:
        stop_all([e.proc for e in engines])
        raise
    return engines


def start_router(policy: str, engines: list[Engine], tokenizer_path: str | None, *extra: str,
                 timeout: float = 60.0) -> tuple[str, subprocess.Popen]:
    """A ``radixfleet router`` process over ``engines``; returns (URL, process) once every
    worker is registered (and, for precise, its KV events are live). Without
    ``tokenizer_path`` the router fetches the tokenizer from the engines."""
    port = free_port()
    cmd = [sys.executable, "-m", "radixfleet", "router", "--port", str(port), "--policy", policy,
           "--worker-urls", *[e.url for e in engines], "--health-check-interval", "2", "--log-level", "warning",
           *(["--tokenizer-path", tokenizer_path] if tokenizer_path else []), *extra]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        wait_ok(url + "/health", timeout, proc)
        while time.monotonic() < deadline:
            workers = httpx.get(url + "/list_workers", timeout=5, trust_env=False).json()["urls"]
            synced = policy not in ("precise", "auto") or metric(url, "radixfleet_router_kv_events_in_sync") >= len(engines)
            if len(workers) == len(engines) and synced:
                return url, proc
            time.sleep(0.1)
        raise TimeoutError(f"router {policy} did not register {len(engines)} workers within {timeout} s")
    except BaseException:
        stop_all([proc])
        raise


def start_replicas(policy: str, engines: list[Engine], tokenizer_paths: list[str | None], *extra: str,
                   announce: bool = True) -> list[tuple[str, subprocess.Popen]]:
    """One router replica per entry of ``tokenizer_paths`` (``start_router``). With
    ``announce``, precise or auto replicas announce their routing decisions to each other
    (``--peer-port``, ``--peers``: each lists every replica, itself included, as a headless
    Service would)."""
    ports: list[int] = []
    if announce and policy in ("precise", "auto") and len(tokenizer_paths) > 1:
        ports = [free_port() for _ in tokenizer_paths]
    peering = ["--peers", *(f"tcp://127.0.0.1:{p}" for p in ports)] if ports else []
    routers: list[tuple[str, subprocess.Popen]] = []
    try:
        for i, path in enumerate(tokenizer_paths):
            own = ["--peer-port", str(ports[i])] if ports else []
            routers.append(start_router(policy, engines, path, *extra, *own, *peering))
    except BaseException:
        stop_all([p for _, p in routers])
        raise
    return routers


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def metric(url: str, name: str, label: str = "") -> float:
    """Sum of the samples of ``name`` (those whose labels contain ``label``) on ``url``/metrics."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=5, trust_env=False).text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def flush_all(engines: list[Engine]) -> None:
    for e in engines:
        resp = httpx.post(e.url + "/flush_cache", timeout=30, trust_env=False)
        assert resp.status_code == 200, resp.text


def context(tenant: int, words: int) -> str:
    rng = random.Random(tenant)
    return f"You are the assistant of tenant {tenant}. Their notes: " + " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Record:
    tenant: int
    turn: int
    worker: str
    prompt_tokens: int
    cached_tokens: int
    ttft: float
    latency: float
    predicted: int | None = None  # a precise router's predicted cached tokens (its header), else None
    sent: float = 0.0  # time.perf_counter() when the request was sent


async def _turn(c: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> tuple[str, Record]:
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, text, usage = None, [], {}
    async with c.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise AssertionError(f"{resp.status_code}: {(await resp.aread())[:300]!r}")
        worker = resp.headers.get("x-radixfleet-worker", "")
        predicted = resp.headers.get("x-radixfleet-predicted-cached-tokens")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta", {}).get("content")
                if delta:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(delta)
            usage = chunk.get("usage") or usage
    latency = time.perf_counter() - start
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return "".join(text), Record(-1, -1, worker, usage.get("prompt_tokens", 0), cached,
                                 latency if ttft is None else ttft, latency,
                                 None if predicted is None else int(predicted), start)


def replica_picker(replica_seed: int | None) -> Callable[[int, int], int]:
    """``pick(i, replicas)``: the replica of request ``i``, in turn or (a seed) at random."""
    if replica_seed is None:
        return lambda i, replicas: i % replicas
    rng = random.Random(replica_seed)
    draws: list[float] = []

    def pick(i: int, replicas: int) -> int:
        while len(draws) <= i:
            draws.append(rng.random())
        return int(draws[i] * replicas)
    return pick


async def run_conversations(router_urls: list[str], tenants: int, turns: int, context_words: int,
                            concurrency: int, max_tokens: int = 8,
                            on_record: Callable[[int], None] | None = None,
                            replica_seed: int | None = None) -> tuple[list[Record], float]:
    """Every tenant's conversation, interleaved; returns the records and the wall time.
    ``router_urls`` is read at each request (``on_record``, called with the number of
    records so far after each one, may change it in place)."""
    gate = asyncio.Semaphore(concurrency)
    records: list[Record] = []
    counter = iter(range(10**9))
    pick = replica_picker(replica_seed)

    async def tenant(t: int, c: httpx.AsyncClient) -> None:
        messages = [{"role": "system", "content": context(t, context_words)}]
        for k in range(turns):
            messages.append({"role": "user", "content": f"Question {k}: which word comes after note {3 * k + t}?"})
            async with gate:
                url = router_urls[pick(next(counter), len(router_urls))]
                answer, rec = await _turn(c, url, messages, max_tokens)
            rec.tenant, rec.turn = t, k
            records.append(rec)
            if on_record is not None:
                on_record(len(records))
            messages.append({"role": "assistant", "content": answer})

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, trust_env=False) as c:
        await asyncio.gather(*(tenant(t, c) for t in range(tenants)))
    return records, time.perf_counter() - start


def shared_context_order(tenants: int, questions: int, burst: int, seed: int = 0) -> list[tuple[int, int]]:
    """The arrival order of the shared-context workload, (tenant, question) pairs: each
    tenant's questions in bursts of ``burst`` consecutive requests; round ``r`` holds burst
    ``r`` of every tenant, tenants shuffled per round (``random.Random(seed)``)."""
    rng = random.Random(seed)
    order: list[tuple[int, int]] = []
    for first in range(0, questions, burst):
        for t in rng.sample(range(tenants), tenants):
            order.extend((t, q) for q in range(first, min(first + burst, questions)))
    return order


async def run_shared_context(router_urls: list[str], tenants: int, questions: int, context_words: int,
                             concurrency: int, burst: int, max_tokens: int = 8, seed: int = 0,
                             on_record: Callable[[int], None] | None = None,
                             order: list[tuple[int, int]] | None = None,
                             replica_seed: int | None = None) -> tuple[list[Record], float]:
    """Tenants with a long shared context (a document in the system prompt) each asking
    ``questions`` independent questions, ``context + question``, not a conversation. The
    requests start in ``shared_context_order`` as ``concurrency`` slots free up, so a
    tenant's burst is in flight at once and tenants interleave; request ``i`` of the order
    goes to replica ``i % len(router_urls)``, or one drawn with ``replica_seed`` (read at each
    request: ``on_record``, as in ``run_conversations``, may change the list). ``order``: another arrival order of
    (tenant, question) pairs instead (``tenants``, ``questions``, ``burst`` and ``seed`` are
    then unused). Returns the records and the wall time."""
    order = order if order is not None else shared_context_order(tenants, questions, burst, seed)
    records: list[Record] = []
    queue = iter(enumerate(order))
    pick = replica_picker(replica_seed)

    async def slot(c: httpx.AsyncClient) -> None:
        for i, (t, q) in queue:
            messages = [{"role": "system", "content": context(t, context_words)},
                        {"role": "user", "content": f"Question {q}: which word comes after note {7 * q + t}?"}]
            _, rec = await _turn(c, router_urls[pick(i, len(router_urls))], messages, max_tokens)
            rec.tenant, rec.turn = t, q
            records.append(rec)
            if on_record is not None:
                on_record(len(records))

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, trust_env=False) as c:
        await asyncio.gather(*(slot(c) for _ in range(concurrency)))
    return records, time.perf_counter() - start


def cache_and_ttft(records: list[Record]) -> dict:
    """requests, cached_token_ratio, ttft_p50_s and ttft_p90_s of some records (TTFTs None if none)."""
    ttfts = sorted(r.ttft for r in records)
    prompt = sum(r.prompt_tokens for r in records)
    return {"requests": len(records),
            "cached_token_ratio": round(sum(r.cached_tokens for r in records) / max(prompt, 1), 4),
            "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
            "ttft_p90_s": round(ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))], 4) if ttfts else None}


def summarize(records: list[Record], elapsed: float) -> dict:
    """Cached-token ratio, TTFT p50/p90, throughput, and the follow-up affinity: the fraction
    of turns after the first that went to the worker that answered the tenant's previous turn."""
    by_tenant: dict[int, list[Record]] = {}
    for r in sorted(records, key=lambda r: (r.tenant, r.turn)):
        by_tenant.setdefault(r.tenant, []).append(r)
    follow = [(prev.worker, r.worker) for rs in by_tenant.values() for prev, r in zip(rs, rs[1:], strict=False)]
    prompt = sum(r.prompt_tokens for r in records)
    return {
        **cache_and_ttft(records),
        "cached_tokens": sum(r.cached_tokens for r in records),
        "prompt_tokens": prompt,
        "req_per_s": round(len(records) / elapsed, 3),
        "prompt_tok_per_s": round(prompt / elapsed, 1),
        "follow_up_affinity": round(sum(a == b for a, b in follow) / len(follow), 4) if follow and follow[0][0] else None,
        "workers_per_tenant": round(statistics.mean(len({r.worker for r in rs}) for rs in by_tenant.values()), 2)
        if records and records[0].worker else None,
        "seconds": round(elapsed, 1),
    }
