"""Routing quality on real engines: round_robin, cache_aware, precise (radixfleet) and
sglang-router's cache_aware, each with 1 and with 3 router replicas, in front of the same 3
CPU engines whose KV pools are small enough to evict (default 2048 tokens each).

The workload (``tests/routing_workload.py``): ``--tenants`` conversations, each with a long
context of its own and ``--turns`` questions, resending the history every turn, interleaved
at ``--concurrency``; requests go to the replicas in turn. Engine caches are flushed between
runs. Prints one JSON line per run: cached-token ratio (engine-reported ``cached_tokens`` /
prompt tokens), TTFT p50/p90 (streamed), requests/s and prompt tokens/s, the follow-up
affinity (turns answered by the worker of the tenant's previous turn; radixfleet's routers
name the worker in a header, sglang-router does not), and for precise the fraction of
requests whose predicted cached tokens equal the reported ones (in whole blocks).
``--publisher-overhead`` adds one line: the radix cache's insert cost with KV events off
and on with nobody subscribed.

    python benchmarks/routing_quality.py [--tenants 30 --turns 4 --context-words 150]
        [--skip-sglang] [--policies precise cache_aware] [--replicas 1 3]

sglang-router 0.3.2 runs from its own venv (``benchmarks/router.py`` installs it under
``$RADIXFLEET_BENCH_CACHE``). Everything shares the machine's cores: compare only figures
from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the workload and fleet helpers are the tests' own
from routing_workload import (  # noqa: E402
    flush_all,
    metric,
    run_conversations,
    start_engines,
    start_router,
    stop_all,
    summarize,
)
from server_process import default_model_dir, free_port, wait_ok  # noqa: E402

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


def start_sglang(python: Path, engines, timeout: float = 60.0) -> tuple[str, subprocess.Popen]:
    port, prom = free_port(), free_port()
    cmd = [str(python), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom), "--policy", "cache_aware",
           "--worker-urls", *[e.url for e in engines]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ok(url + "/health", timeout, proc)
    except BaseException:
        stop_all([proc])
        raise
    return url, proc


def run(name: str, routers: list[tuple[str, subprocess.Popen]], engines, args) -> None:
    urls = [u for u, _ in routers]
    try:
        # One warm-up request per engine (first-call costs), then the measured run.
        asyncio.run(run_conversations(urls[:1], 1, 1, 10, 1))
        flush_all(engines)
        before = predictions(urls)
        records, elapsed = asyncio.run(run_conversations(urls, args.tenants, args.turns, args.context_words,
                                                         args.concurrency, args.max_tokens))
        line = {"bench": "routing_quality", "router": name, "replicas": len(urls), **summarize(records, elapsed)}
        if name == "radixfleet_precise":
            outcomes = {o: n - before[o] for o, n in predictions(urls).items()}
            line["prediction_exact_fraction"] = round(outcomes["exact"] / max(sum(outcomes.values()), 1), 4)
            line["predictions"] = outcomes
            line["resyncs"] = sum(metric(u, "radixfleet_router_kv_event_resyncs_total") for u in urls)
        emit(**line)
    finally:
        stop_all([p for _, p in routers])
        flush_all(engines)


def predictions(urls: list[str]) -> dict[str, float]:
    return {o: sum(metric(u, "radixfleet_router_cached_tokens_predictions_total", f'outcome="{o}"') for u in urls)
            for o in ("exact", "over", "under")}


def publisher_overhead(inserts: int = 2000, tokens: int = 512) -> None:
    """Radix-cache inserts with KV events off, and on with nobody subscribed (µs per insert)."""
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

    publisher = KVEventPublisher("127.0.0.1", free_port(), 16)
    try:
        off = statistics.median(measure(None) for _ in range(3))
        on = statistics.median(measure(publisher) for _ in range(3))
    finally:
        publisher.close()
    emit(bench="publisher_overhead", tokens_per_insert=tokens, inserts=inserts, events_off_us=round(off, 1),
         events_on_no_subscriber_us=round(on, 1), added_us_per_insert=round(on - off, 1), messages=publisher.seq)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=30)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--context-words", type=int, default=150)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--kv-pool", type=int, default=2048, help="KV-cache tokens per engine")
    ap.add_argument("--policies", nargs="+", default=["round_robin", "cache_aware", "precise", "sglang"])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--skip-sglang", action="store_true")
    ap.add_argument("--publisher-overhead", action="store_true")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the engines and routers on the way out
    torch.set_num_threads(1)
    if args.publisher_overhead:
        publisher_overhead()
    model_dir = default_model_dir()
    sglang = None if args.skip_sglang or "sglang" not in args.policies else sglang_python()
    engines = start_engines(3, model_dir, args.kv_pool)
    emit(bench="setup", engines=3, kv_pool=args.kv_pool, tenants=args.tenants, turns=args.turns,
         context_words=args.context_words, concurrency=args.concurrency, sglang_router=sglang is not None)
    try:
        for replicas in args.replicas:
            for policy in args.policies:
                if policy == "sglang":
                    if sglang is not None:
                        run("sglang_router_cache_aware", [start_sglang(sglang, engines) for _ in range(replicas)],
                            engines, args)
                    continue
                routers = [start_router(policy, engines, model_dir) for _ in range(replicas)]
                run(f"radixfleet_{policy}", routers, engines, args)
    finally:
        stop_all([e.proc for e in engines])
    return 0


if __name__ == "__main__":
    sys.exit(main())
