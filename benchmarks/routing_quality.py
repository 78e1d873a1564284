"""Routing quality on real engines: round_robin, cache_aware, precise (radixfleet) and
sglang-router's cache_aware, each with 1 and with 3 router replicas, in front of the same 3
CPU engines whose KV pools are small enough to evict (default 2048 tokens each).

The workload (``tests/routing_workload.py``): ``--tenants`` conversations, each with a long
context of its own and ``--turns`` questions, resending the history every turn, interleaved
at ``--concurrency``; each request goes to a replica drawn at random (seeded: the same
draws for every router), as a Kubernetes Service spreads connections; ``--replica-choice
turn`` sends request ``i`` to replica ``i % R`` instead, as runs before 2026-12-07 did,
which lines up round_robin routers (each counts its requests from 0) so that ``R``
consecutive requests, a tenant's burst among them, reach one worker. ``--workload shared-context``
(or both: ``--workload conversations shared-context``, against the same engines) gives each tenant a long shared context (``--context-words`` 400, about 770 tokens)
and ``--questions`` independent requests ``context + question``, ``--burst`` of a tenant's
at once, tenants shuffled per round with a fixed seed (the same order for every router), so
that under load one tenant's context is computed and held on more than one worker.
``--workload hot-tenant`` is shared-context plus one hot tenant (tenant 0, its own context):
each round opens with a burst of the hot tenant's questions, ``--hot-share`` of all requests
(0.5: as many as the round's cold ones), then the round's bursts of the ``--tenants`` cold
tenants, whose contexts under KV pressure evict older ones. With a small
``--balance-abs-threshold`` (passed to every router, sglang-router's included) the
imbalance rule spreads the hot burst over several workers, so the hot context is held on
two or three of them and some of those copies are evicted between rounds; the summary adds
``hot`` and ``cold`` (those tenants' requests: cached ratio, TTFT, how many recomputed their
context and how many of those went to a worker that had already answered the same tenant,
i.e. to an evicted copy).
Engine caches are flushed between runs. Prints one JSON line per run: cached-token ratio (engine-reported ``cached_tokens`` /
prompt tokens), TTFT p50/p90 (streamed), requests/s and prompt tokens/s, the follow-up
affinity (turns answered by the worker of the tenant's previous turn; radixfleet's routers
name the worker in a header, sglang-router does not), and for precise the fraction of
requests whose predicted cached tokens equal the reported ones (in whole blocks). Several
precise replicas announce their routing decisions to each other (``--peer-port``,
``--peers``; ``--no-peer-announcements``: not, as runs before 2026-12-07).
``--restart-routers-after K`` restarts the routers once K requests have finished (fresh
processes take every later request, as after a deploy or a crash): a restarted cache_aware
router has an empty approximate tree, a precise one loads the engines' snapshots.
``--publisher-overhead`` adds two lines first: the radix cache's insert cost with KV events
off, on with nobody subscribed and on with a subscriber (``publisher_overhead``); and end to
end, one engine's prefill throughput on distinct prompts (every request stores new blocks and,
once the pool is full, evicts) with events off (a fourth engine), on with nobody subscribed and
on with this process subscribed, in interleaved rounds (``publisher_overhead_e2e``, medians).

    python benchmarks/routing_quality.py [--tenants 30 --turns 4 --context-words 150]
        [--workload shared-context --questions 6 --burst 3 --context-words 400]
        [--workload hot-tenant --hot-share 0.5 --balance-abs-threshold 2]
        [--skip-sglang] [--policies precise cache_aware] [--replicas 1 3] [--restart-routers-after K]

sglang-router 0.3.2 runs from its own venv (``benchmarks/router.py`` installs it under
``$RADIXFLEET_BENCH_CACHE``). Everything shares the machine's cores: compare only figures
from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
import zmq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the workload and fleet helpers are the tests' own
from routing_workload import (  # noqa: E402
    cache_and_ttft,
    context,
    flush_all,
    metric,
    run_conversations,
    run_shared_context,
    shared_context_order,
    start_engines,
    start_replicas,
    stop_all,
    summarize,
)
from server_process import default_model_dir, free_port, wait_ok  # noqa: E402

from radixfleet import kv_events  # noqa: E402
from radixfleet.engine.memory.allocator import TokenSlotAllocator  # noqa: E402
from radixfleet.engine.memory.radix_cache import RadixCache  # noqa: E402


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def sglang_python() -> Path | None:
    spec = importlib.util.spec_from_file_location("bench_router", HERE / "router.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sglang_router_python()


def start_sglang(python: Path, engines, *extra: str, timeout: float = 60.0) -> tuple[str, subprocess.Popen]:
    port, prom = free_port(), free_port()
    cmd = [str(python), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom), "--policy", "cache_aware",
           "--worker-urls", *[e.url for e in engines], *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ok(url + "/health", timeout, proc)
    except BaseException:
        stop_all([proc])
        raise
    return url, proc


def hot_tenant_order(tenants: int, questions: int, burst: int, hot_share: float,
                     seed: int = 0) -> list[tuple[int, int]]:
    """The hot-tenant workload's arrival order, (tenant, question) pairs: tenant 0 is hot,
    tenants 1..``tenants`` are the cold ones of ``shared_context_order``; each round (one
    burst of every cold tenant) opens with a burst of hot questions, so many that they make
    ``hot_share`` of the requests (at least one per round)."""
    if not 0.0 < hot_share < 1.0:
        raise ValueError(f"hot_share must be in (0, 1), got {hot_share}")
    cold = [(t + 1, q) for t, q in shared_context_order(tenants, questions, burst, seed)]
    order: list[tuple[int, int]] = []
    asked = 0
    for first in range(0, questions, burst):
        in_round = cold[first * tenants:min(first + burst, questions) * tenants]
        hot = max(1, round(hot_share / (1.0 - hot_share) * len(in_round)))
        order += [(0, q) for q in range(asked, asked + hot)] + in_round
        asked += hot
    return order


def tenants_summary(records) -> dict:
    """Some tenants' requests, in the order they finished: how many found less than half their
    prompt cached (``recomputed``: the context computed again), and of those how many went to
    a worker that had already answered the same tenant (``on_evicted_copy``: its copy there
    was evicted, while a router's approximate tree still lists it there); for a precise
    router, how many of those it predicted (``predicted_miss``: it knew the worker did not
    hold it, e.g. under the imbalance rule), expected cached (``predicted_hit``), or routed
    by the approximate tree, with no prediction (``unpredicted``: that worker's events late).
    Without worker names (sglang-router) only ``recomputed`` is known."""
    served: set[tuple[int, str]] = set()
    recomputed = evicted = predicted_miss = predicted_hit = 0
    for r in records:
        if r.cached_tokens * 2 < r.prompt_tokens:
            recomputed += 1
            if (r.tenant, r.worker) in served:
                evicted += 1
                if r.predicted is not None:
                    predicted_miss += r.predicted * 2 < r.prompt_tokens
                    predicted_hit += r.predicted * 2 >= r.prompt_tokens
        served.add((r.tenant, r.worker))
    named = bool(records) and bool(records[0].worker)
    out = {**cache_and_ttft(records), "recomputed": recomputed, "on_evicted_copy": evicted if named else None}
    if named:
        out["workers_per_tenant"] = round(len(served) / len({r.tenant for r in records}), 2)
    if any(r.predicted is not None for r in records):
        out.update(predicted_miss=predicted_miss, predicted_hit=predicted_hit,
                   unpredicted=evicted - predicted_miss - predicted_hit)
    return out


def predictions_apart(records, window: float = 0.05) -> dict:
    """Predicted against reported cached tokens (in whole blocks, as the router counts them),
    split by whether another request of the same tenant was sent within ``window`` seconds
    (``together``; with several replicas, one routed before the other's ``queued`` event can
    reach it) or not (``apart``): exact requests and all requests of each."""
    out = {"together": [0, 0], "apart": [0, 0]}
    by_tenant: dict[int, list[float]] = {}
    for r in records:
        by_tenant.setdefault(r.tenant, []).append(r.sent)
    for r in records:
        if r.predicted is None:
            continue
        close = sum(abs(t - r.sent) <= window for t in by_tenant[r.tenant]) > 1
        kind = out["together" if close else "apart"]
        kind[0] += r.predicted == r.cached_tokens // kv_events.DEFAULT_BLOCK_SIZE * kv_events.DEFAULT_BLOCK_SIZE
        kind[1] += 1
    return {k: {"exact": e, "requests": n} for k, (e, n) in out.items()}


def run(name: str, start: Callable[[], list[tuple[str, subprocess.Popen]]], engines, args, workload: str) -> None:
    """One measured run of the workload through the routers ``start()`` returns. With
    ``--restart-routers-after K``, once K requests have finished, a fresh set of routers is
    started and takes every later request (a rolling restart: the old ones finish what they
    hold, then idle until the run ends)."""
    routers = start()
    urls = [u for u, _ in routers]
    replicas = len(urls)
    words = args.context_words or (150 if workload == "conversations" else 400)
    swaps: list[asyncio.Task] = []

    def on_record(count: int) -> None:
        if count == args.restart_routers_after:
            async def swap() -> None:
                fresh = await asyncio.to_thread(start)
                routers.extend(fresh)
                urls[:] = [u for u, _ in fresh]
            swaps.append(asyncio.get_running_loop().create_task(swap()))

    async def measured(workload_run):
        records, elapsed = await workload_run
        for task in swaps:
            await task  # surface a failed restart
        return records, elapsed

    try:
        # One warm-up request per engine (first-call costs), then the measured run.
        asyncio.run(run_conversations(urls[:1], 1, 1, 10, 1))
        flush_all(engines)
        before = predictions(urls)
        seed = None if args.replica_choice == "turn" else 0
        if workload in ("shared-context", "hot-tenant"):
            order = (hot_tenant_order(args.tenants, args.questions, args.burst, args.hot_share)
                     if workload == "hot-tenant" else None)
            records, elapsed = asyncio.run(measured(run_shared_context(
                urls, args.tenants, args.questions, words, args.concurrency, args.burst, args.max_tokens,
                on_record=on_record, order=order, replica_seed=seed)))
        else:
            records, elapsed = asyncio.run(measured(run_conversations(
                urls, args.tenants, args.turns, words, args.concurrency, args.max_tokens, on_record=on_record,
                replica_seed=seed)))
        urls = [u for u, _ in routers]  # every router that served, for the counters
        line = {"bench": "routing_quality", "workload": workload, "router": name, "replicas": replicas,
                **summarize(records, elapsed)}
        if args.restart_routers_after:
            line["routers_restarted_after"] = args.restart_routers_after
        if workload == "hot-tenant":
            line["hot"] = tenants_summary([r for r in records if r.tenant == 0])
            line["cold"] = tenants_summary([r for r in records if r.tenant != 0])
        if args.balance_abs_threshold is not None:
            line["balance_abs_threshold"] = args.balance_abs_threshold
        if args.records:
            with open(args.records, "a") as f:
                for r in records:
                    f.write(json.dumps({"workload": workload, "router": name, "replicas": replicas,
                                        **dataclasses.asdict(r)}) + "\n")
        if name == "radixfleet_precise":
            outcomes = {o: n - before.get(o, 0) for o, n in predictions(urls).items()}
            line["prediction_exact_fraction"] = round(outcomes["exact"] / max(sum(outcomes.values()), 1), 4)
            line["predictions"] = outcomes
            line["predictions_by_send_time"] = predictions_apart(records)
            line["resyncs"] = sum(metric(u, "radixfleet_router_kv_event_resyncs_total") for u in urls)
            line["peer_announcements"] = {
                o: sum(metric(u, "radixfleet_router_peer_routes_total", f'outcome="{o}"') for u in urls)
                for o in ("applied", "known")}
            lag = {le: sum(metric(u, "radixfleet_router_peer_route_lag_seconds_bucket", f'le="{le}"') for u in urls)
                   for le in ("0.001", "0.0025", "0.005", "0.01", "+Inf")}
            if lag["+Inf"]:
                line["peer_lag_within_s"] = {le: round(n / lag["+Inf"], 3) for le, n in lag.items() if le != "+Inf"}
            if workload == "hot-tenant":  # start: one per worker and router; stale, gap, restart: scored approximately meanwhile
                line["resyncs_by_reason"] = {
                    why: sum(metric(u, "radixfleet_router_kv_event_resyncs_total", f'reason="{why}"') for u in urls)
                    for why in ("start", "stale", "gap", "restart")}
        emit(**line)
    finally:
        stop_all([p for _, p in routers])
        flush_all(engines)


def predictions(urls: list[str]) -> dict[str, float]:
    return {o: sum(metric(u, "radixfleet_router_cached_tokens_predictions_total", f'outcome="{o}"') for u in urls)
            for o in ("exact", "over", "under")}


def publisher_overhead(inserts: int = 2000, tokens: int = 512) -> None:
    """Radix-cache inserts with KV events off, on with nobody subscribed, and on with a
    subscriber (µs per insert)."""
    from radixfleet.engine.managers.kv_publisher import KVEventPublisher

    def measure(events) -> float:
        alloc = TokenSlotAllocator(inserts * tokens // 4, 1)
        cache = RadixCache(alloc, 1, events=events)
        seqs = [[i % 50] * (tokens // 2) + list(range(i, i + tokens // 2)) for i in range(inserts)]  # shared halves
        took = 0.0
        for seq in seqs:
            if alloc.available < len(seq):
                cache.evict(len(seq))
            slots = alloc.alloc(len(seq))
            t0 = time.perf_counter()
            prefix = cache.insert(seq, slots)
            took += time.perf_counter() - t0
            alloc.free(slots[:prefix])
        return took / inserts * 1e6

    port = free_port()
    publisher = KVEventPublisher("127.0.0.1", port, 16)
    ctx = zmq.Context()
    try:
        off = statistics.median(measure(None) for _ in range(3))
        idle = statistics.median(measure(publisher) for _ in range(3))
        idle_messages = publisher.seq
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, kv_events.TOPIC)
        sub.setsockopt(zmq.RCVHWM, 0)  # keep every message (the subscriber reads them afterwards)
        sub.connect(f"tcp://127.0.0.1:{port}")
        deadline, empty = time.monotonic() + 10, RadixCache(TokenSlotAllocator(2, 1), 1, events=publisher)
        while not publisher.active and time.monotonic() < deadline:
            publisher.tick(empty)
            time.sleep(0.01)
        assert publisher.active, "the subscription did not reach the publisher"
        on = statistics.median(measure(publisher) for _ in range(3))
    finally:
        publisher.close()
        ctx.destroy(linger=0)
    emit(bench="publisher_overhead", tokens_per_insert=tokens, inserts=inserts, events_off_us=round(off, 1),
         events_on_no_subscriber_us=round(idle, 1), events_on_subscribed_us=round(on, 1),
         added_us_no_subscriber=round(idle - off, 1), added_us_subscribed=round(on - off, 1),
         messages_no_subscriber=idle_messages, messages_subscribed=publisher.seq - idle_messages)


def publisher_overhead_e2e(events_on, events_off, prompts: int, rounds: int, words: int) -> None:
    """One engine's throughput on distinct prompts (``max_tokens`` 1, 2 at a time): events
    off (``events_off``), on with nobody subscribed and on with a subscriber (``events_on``,
    before any router follows it); configurations interleaved, order rotated each round."""
    serial = iter(range(10**9))

    async def load(url: str) -> float:
        gate = asyncio.Semaphore(2)
        tokens = 0

        async def one(c: httpx.AsyncClient) -> None:
            nonlocal tokens
            body = {"model": "default", "prompt": context(10**6 + next(serial), words), "max_tokens": 1,
                    "temperature": 0}
            async with gate:
                resp = await c.post(url + "/v1/completions", json=body)
            assert resp.status_code == 200, resp.text
            tokens += resp.json()["usage"]["prompt_tokens"]

        start = time.perf_counter()
        async with httpx.AsyncClient(timeout=600, trust_env=False) as c:
            await asyncio.gather(*(one(c) for _ in range(prompts)))
        return tokens / (time.perf_counter() - start)

    ctx = zmq.Context()
    received = [0]

    def subscribed(url: str) -> float:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, kv_events.TOPIC)
        sub.connect(f"tcp://127.0.0.1:{events_on.events_port}")
        stop = threading.Event()

        def drain() -> None:  # a subscriber that keeps up, as a router's does
            while not stop.is_set():
                if sub.poll(50):
                    sub.recv_multipart()
                    received[0] += 1

        reader = threading.Thread(target=drain)
        reader.start()
        try:
            deadline = time.monotonic() + 10
            while received[0] == 0 and time.monotonic() < deadline:  # the heartbeat sent on activation
                time.sleep(0.01)
            assert received[0], "no KV event reached the subscriber"
            return asyncio.run(load(url))
        finally:
            stop.set()
            reader.join()
            sub.close(linger=0)
            time.sleep(0.5)  # the engine sees the subscriber leave before the next measurement

    runs: dict[str, tuple] = {"events_off": (lambda u: asyncio.run(load(u)), events_off.url),
                              "events_on_no_subscriber": (lambda u: asyncio.run(load(u)), events_on.url),
                              "events_on_subscribed": (subscribed, events_on.url)}
    tok_s: dict[str, list[float]] = {name: [] for name in runs}
    try:
        asyncio.run(load(events_off.url)), asyncio.run(load(events_on.url))  # warm-up
        names = list(runs)
        for r in range(rounds):
            for name in names[r % 3:] + names[:r % 3]:
                fn, url = runs[name]
                tok_s[name].append(fn(url))
    finally:
        ctx.destroy(linger=0)
    med = {name: statistics.median(v) for name, v in tok_s.items()}
    emit(bench="publisher_overhead_e2e", prompts=prompts, rounds=rounds,
         **{f"{name}_prompt_tok_per_s": round(v, 1) for name, v in med.items()},
         no_subscriber_vs_off=round(med["events_on_no_subscriber"] / med["events_off"], 3),
         subscribed_vs_off=round(med["events_on_subscribed"] / med["events_off"], 3),
         spread={name: [round(x, 1) for x in v] for name, v in tok_s.items()}, messages_received=received[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=30, help="tenants (hot-tenant: cold ones, besides the hot one)")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--workload", nargs="+", choices=["conversations", "shared-context", "hot-tenant"],
                    default=["conversations"], help="one or more, each run against the same engines")
    ap.add_argument("--context-words", type=int, help="words of each tenant's context (default 150; shared-context 400)")
    ap.add_argument("--questions", type=int, default=6, help="shared-context: questions per tenant")
    ap.add_argument("--burst", type=int, default=3, help="shared-context: a tenant's questions sent at once")
    ap.add_argument("--hot-share", type=float, default=0.5,
                    help="hot-tenant: the hot tenant's share of the requests, in (0, 1)")
    ap.add_argument("--balance-abs-threshold", type=int, metavar="N",
                    help="every router's --balance-abs-threshold (imbalanced when the in-flight spread exceeds N; "
                         "default: each router's own, 32 radixfleet, 64 sglang-router)")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--kv-pool", type=int, default=2048, help="KV-cache tokens per engine")
    ap.add_argument("--policies", nargs="+", default=["round_robin", "cache_aware", "precise", "sglang"])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--replica-choice", choices=["random", "turn"], default="random",
                    help="which router replica takes each request: drawn at random (seeded), or in turn")
    ap.add_argument("--no-peer-announcements", action="store_true",
                    help="precise replicas do not announce their routing decisions to each other (as before 2026-12-07)")
    ap.add_argument("--peer-hold", type=float, metavar="S",
                    help="precise replicas' --peer-hold (default: the router's, 0.003; 0: off)")
    ap.add_argument("--skip-sglang", action="store_true")
    ap.add_argument("--publisher-overhead", action="store_true")
    ap.add_argument("--overhead-prompts", type=int, default=16, help="prompts per end-to-end overhead measurement")
    ap.add_argument("--overhead-rounds", type=int, default=3)
    ap.add_argument("--restart-routers-after", type=int, default=0, metavar="K",
                    help="once K requests have finished, start fresh routers and send every later request "
                         "to them (a rolling restart of the router; 0: never)")
    ap.add_argument("--records", help="append every request's record (tenant, turn, worker, cached tokens, TTFT) "
                                      "to this JSON-lines file")
    args = ap.parse_args()
    if not 0.0 < args.hot_share < 1.0:
        ap.error(f"--hot-share must be in (0, 1), got {args.hot_share}")
    if args.balance_abs_threshold is not None and args.balance_abs_threshold < 0:
        ap.error(f"--balance-abs-threshold must be >= 0, got {args.balance_abs_threshold}")
    extra = [] if args.balance_abs_threshold is None else ["--balance-abs-threshold", str(args.balance_abs_threshold)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the engines and routers on the way out
    torch.set_num_threads(1)
    if args.publisher_overhead:
        publisher_overhead()
    model_dir = default_model_dir()
    sglang = None if args.skip_sglang or "sglang" not in args.policies else sglang_python()
    engines = start_engines(3, model_dir, args.kv_pool)
    try:
        if args.publisher_overhead:
            quiet = start_engines(1, model_dir, args.kv_pool, kv_events=False)
            try:
                publisher_overhead_e2e(engines[0], quiet[0], args.overhead_prompts, args.overhead_rounds,
                                       args.context_words or 150)
            finally:
                stop_all([e.proc for e in quiet])
            flush_all(engines)
        emit(bench="setup", engines=3, kv_pool=args.kv_pool, workloads=args.workload, tenants=args.tenants,
             turns=args.turns, questions=args.questions, burst=args.burst, context_words=args.context_words,
             concurrency=args.concurrency, sglang_router=sglang is not None, hot_share=args.hot_share,
             balance_abs_threshold=args.balance_abs_threshold, replica_choice=args.replica_choice,
             peer_announcements=not args.no_peer_announcements, peer_hold=args.peer_hold)
        for workload in args.workload:
            for replicas in args.replicas:
                for policy in args.policies:
                    if policy == "sglang":
                        if sglang is not None:
                            run("sglang_router_cache_aware",
                                lambda n=replicas: [start_sglang(sglang, engines, *extra) for _ in range(n)],
                                engines, args, workload)
                        continue
                    hold = ["--peer-hold", str(args.peer_hold)] if args.peer_hold is not None and policy in ("precise", "auto") else []
                    run(f"radixfleet_{policy}",
                        lambda p=policy, n=replicas, h=hold: start_replicas(p, engines, [model_dir] * n, *extra, *h,
                                                                            announce=not args.no_peer_announcements),
                        engines, args, workload)
    finally:
        stop_all([e.proc for e in engines])
    return 0


if __name__ == "__main__":
    sys.exit(main())
