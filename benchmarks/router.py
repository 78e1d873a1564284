"""Router benchmark: radixfleet's router vs sglang-router 0.3.2 over the same fake workers.

One bounded run on loopback. Prints JSON lines:

- ``defaults``: an in-process simulation (no HTTP) of the cache_aware policy under SGLang's two
  documented default sets, on 8 prefix groups with skewed popularity; justifies RouterConfig's
  defaults (affinity, cache hit ratio, load balance, simulated throughput).
- ``tree``: radix-tree memory per character and eviction time, for ``max_tree_size``.
- ``direct`` / ``radixfleet`` / ``sglang_router``: req/s at concurrency 32, latency p50/p99 at
  concurrency 1 and 32, added latency vs hitting a worker directly, prefix affinity.

    python benchmarks/router.py [--latency 0.02] [--seconds 8] [--skip-sglang]

sglang-router is pip-installed into its own venv under ~/.cache/radixfleet/bench the first
time; when that fails a JSON line says so and radixfleet is measured alone. Everything shares
the machine's cores: compare figures only from runs with a low ``load_average_1m``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import heapq
import json
import os
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from radixfleet import env_vars
from radixfleet.router.circuit_breaker import CircuitBreaker
from radixfleet.router.config import RouterConfig
from radixfleet.router.policies.cache_aware import CacheAwarePolicy
from radixfleet.router.policies.radix_tree import RadixTree
from radixfleet.router.worker import Worker

# The fake workers and loopback helpers are the router tests' own (tests/router_harness.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from router_harness import FakeWorkerProcess, free_port, wait_ok  # noqa: E402

SGLANG_ROUTER_VERSION = "0.3.2"
CACHE_DIR = Path(env_vars.BENCH_CACHE.get() or Path.home() / ".cache" / "radixfleet" / "bench")
GROUPS = 8


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def system_prompt(g: int, chars: int = 4000) -> str:
    rng = random.Random(g)
    words = []
    while sum(map(len, words)) < chars:
        words.append(rng.choice(["alpha ", "beta ", "gamma ", "delta ", "omega ", "sigma "]))
    return f"You are assistant {g}. " + "".join(words)


# ---------------------------------------------------------------- defaults: simulation


def simulate(params: dict, workers: int = 2, concurrency: int = 32, requests: int = 4000, capacity: int = 4) -> dict:
    """Closed loop of ``concurrency`` clients over FIFO workers with an exact LRU prefix cache
    of ``capacity`` system prompts each. Service time: 5 ms + 1 us per uncached character."""
    rng = random.Random(1)
    config = RouterConfig(**params)
    policy = CacheAwarePolicy(config)
    ws = [Worker(f"w{i}", CircuitBreaker(1, 1.0)) for i in range(workers)]
    for w in ws:
        policy.add_worker(w.url)
    weights = [1 / (g + 1) ** 1.1 for g in range(GROUPS)]  # Zipf-like popularity
    prompts = [system_prompt(g) for g in range(GROUPS)]
    caches = [collections.OrderedDict() for _ in ws]
    free_at = [0.0] * workers
    events: list[tuple[float, int, int]] = []  # (finish time, seq, worker index)
    served = collections.defaultdict(collections.Counter)
    cached_chars = total_chars = 0
    per_worker = [0] * workers
    now, seq, sent = 0.0, 0, 0

    def send(t: float) -> None:
        nonlocal seq, sent, cached_chars, total_chars
        g = rng.choices(range(GROUPS), weights)[0]
        text = prompts[g] + f" question {sent}"
        w, _ = policy.select(ws, text)
        i = ws.index(w)
        hit = g in caches[i]
        caches[i][g] = True
        caches[i].move_to_end(g)
        if len(caches[i]) > capacity:
            caches[i].popitem(last=False)
        uncached = len(text) - (len(prompts[g]) if hit else 0)
        cached_chars += len(text) - uncached
        total_chars += len(text)
        start = max(t, free_at[i])
        free_at[i] = start + 0.005 + uncached * 1e-6
        w.in_flight += 1
        served[g][i] += 1
        per_worker[i] += 1
        seq += 1
        sent += 1
        heapq.heappush(events, (free_at[i], seq, i))

    for _ in range(concurrency):
        send(0.0)
    while events:
        now, _, i = heapq.heappop(events)
        ws[i].in_flight -= 1
        if sent < requests:
            send(now)
    return {
        "affinity": round(sum(max(c.values()) for c in served.values()) / requests, 4),
        "cache_hit_ratio": round(cached_chars / total_chars, 4),
        "max_worker_share": round(max(per_worker) / requests, 4),
        "sim_req_per_s": round(requests / now, 1),
    }


def bench_defaults() -> None:
    """SGLang's two documented default sets (plus references) over four fleet shapes."""
    candidates = {
        "docs_a_0.5_32_1.0001 (radixfleet default)": dict(cache_threshold=0.5, balance_abs_threshold=32, balance_rel_threshold=1.0001),
        "docs_b_0.3_64_1.5 (sglang-router 0.3.2 default)": dict(cache_threshold=0.3, balance_abs_threshold=64, balance_rel_threshold=1.5),
        "reference_0.5_16_1.5": dict(cache_threshold=0.5, balance_abs_threshold=16, balance_rel_threshold=1.5),
        "reference_least_loaded": dict(balance_abs_threshold=0, balance_rel_threshold=1.0),
    }
    totals = dict.fromkeys(candidates, 0.0)
    for workers, concurrency in ((2, 32), (4, 32), (4, 128), (8, 128)):
        for name, params in candidates.items():
            result = simulate(params, workers, concurrency)
            totals[name] += result["sim_req_per_s"]
            emit(bench="defaults", params=name, workers=workers, concurrency=concurrency, **result)
    emit(bench="defaults_summary", sum_of_sim_req_per_s={k: round(v, 1) for k, v in totals.items()})


def bench_tree(chars: int = 2**21) -> None:
    rng = random.Random(2)
    tracemalloc.start()
    tree = RadixTree()
    base = [system_prompt(g, 2000) for g in range(64)]
    while tree.size < chars:
        tree.insert(rng.choice(base) + "".join(rng.choice("abcdefgh ") for _ in range(400)))
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t0 = time.perf_counter()
    tree.evict(chars // 2)
    evict_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(1000):
        tree.match(base[0] + "abc")
    emit(bench="tree", chars=chars, bytes_per_char=round(used / chars, 1),
         evict_half_seconds=round(evict_s, 3), match_4k_prefix_us=round((time.perf_counter() - t0) * 1e3, 1),
         note=f"extrapolated to max_tree_size=2**24 per worker: ~{used / chars * 2**24 / 2**20:.0f} MiB, "
              f"evicting half in ~{evict_s * 2**24 / chars:.1f} s (in a thread, every eviction_interval)")


# ---------------------------------------------------------------- HTTP load generator


class Conn:
    """A minimal HTTP/1.1 keep-alive client connection: cheap enough not to be the bottleneck."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        reader = self.reader
        status = int((await reader.readline()).split()[1])
        length, chunked = None, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
        if chunked:
            parts = []
            while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
                parts.append((await reader.readexactly(size + 2))[:-2])
            await reader.readline()
            return status, b"".join(parts)
        return status, await reader.readexactly(length or 0)


async def load(port: int, concurrency: int, bodies, seconds: float, max_requests: int) -> dict:
    """Closed loop: ``concurrency`` connections sending ``bodies(i)`` to /generate."""
    conns = [Conn("127.0.0.1", port) for _ in range(concurrency)]
    latencies: list[float] = []
    served = collections.defaultdict(collections.Counter)
    errors = 0
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + seconds

    async def client(conn: Conn) -> None:
        nonlocal errors
        for i in counter:
            if time.perf_counter() > deadline:
                return
            group, body = bodies(i)
            t0 = time.perf_counter()
            status, payload = await conn.post("/generate", body)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors += 1
            else:
                served[group][json.loads(payload)["worker"]] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in conns))
    wall = time.perf_counter() - t0
    for c in conns:
        if c.writer:
            c.writer.close()
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n, "errors": errors, "req_per_s": round(n / wall, 1),
        "p50_ms": round(latencies[n // 2] * 1e3, 3), "p99_ms": round(latencies[min(n - 1, int(n * 0.99))] * 1e3, 3),
        "mean_ms": round(statistics.fmean(latencies) * 1e3, 3),
        "affinity": round(sum(max(c.values()) for c in served.values()) / max(1, sum(sum(c.values()) for c in served.values())), 4),
    }


def plain_body(i: int) -> tuple[int, bytes]:
    return 0, json.dumps({"text": f"request {i}", "sampling_params": {"max_new_tokens": 8}}).encode()


PROMPTS = [system_prompt(g, 2000) for g in range(GROUPS)]


def grouped_body(i: int) -> tuple[int, bytes]:
    g = random.Random(i).randrange(GROUPS)
    return g, json.dumps({"text": PROMPTS[g] + f" Question {i}?", "sampling_params": {"max_new_tokens": 8}}).encode()


def measure(name: str, port: int, seconds: float, latency: float, direct: dict | None = None) -> dict:
    c1 = asyncio.run(load(port, 1, plain_body, seconds / 2, 100_000))
    c32 = asyncio.run(load(port, 32, plain_body, seconds, 1_000_000))
    aff = asyncio.run(load(port, 32, grouped_body, seconds / 2, 2_000))
    record = {"bench": name, "worker_latency_s": latency, "c1": c1, "c32": c32, "prefix_affinity_8_groups": aff["affinity"]}
    if direct is not None:
        record["added_p50_ms_c1"] = round(c1["p50_ms"] - direct["c1"]["p50_ms"], 3)
        record["added_p99_ms_c1"] = round(c1["p99_ms"] - direct["c1"]["p99_ms"], 3)
        record["added_p50_ms_c32"] = round(c32["p50_ms"] - direct["c32"]["p50_ms"], 3)
        record["added_p99_ms_c32"] = round(c32["p99_ms"] - direct["c32"]["p99_ms"], 3)
    emit(**record)
    return record


# ---------------------------------------------------------------- routers under test


def sglang_router_python() -> Path | None:
    venv = CACHE_DIR / f"sglang-router-{SGLANG_ROUTER_VERSION}"
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import sglang_router"], capture_output=True).returncode == 0:
        return python
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        # cwd "/": from the checkout root, its operator/ folder would shadow the standard library.
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120, cwd="/")
        subprocess.run([python, "-m", "pip", "install", "-q", f"sglang-router=={SGLANG_ROUTER_VERSION}"],
                       check=True, capture_output=True, timeout=600, cwd="/")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        stderr = getattr(e, "stderr", b"") or b""
        emit(bench="sglang_router", skipped=True, reason=f"cannot install sglang-router=={SGLANG_ROUTER_VERSION}: {e} {stderr[-500:].decode(errors='replace')}")
        return None
    return python


def start(cmd: list[str], health_url: str, timeout: float = 60.0, cwd: Path | None = None) -> subprocess.Popen:
    # cwd: a venv's `python -m` puts the cwd first on sys.path, and the repo root has an
    # `operator/` folder that would shadow the standard library there.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    wait_ok(health_url, timeout, proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.02, help="fake worker latency in seconds (a second pass uses 0)")
    ap.add_argument("--seconds", type=float, default=6.0, help="duration of the concurrency-32 run per target")
    ap.add_argument("--skip-sglang", action="store_true")
    args = ap.parse_args()
    emit(bench="setup", cpus=os.cpu_count(), load_average_1m=round(os.getloadavg()[0], 2), python=sys.version.split()[0], workers=2,
         passes=[args.latency, 0.0], note="pass 2 uses zero-latency workers: the router's own overhead, free of timer jitter")
    bench_defaults()
    bench_tree()
    python = None if args.skip_sglang else sglang_router_python()
    for latency in dict.fromkeys([args.latency, 0.0]):
        run_pass(latency, args.seconds, python)
    return 0


def run_pass(latency: float, seconds: float, sglang_python: Path | None) -> None:
    """Direct, radixfleet and sglang-router over two fake workers of the given latency."""
    workers = [FakeWorkerProcess(f"w{i}", latency=latency).start() for i in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        for w in workers:
            w.wait()
        urls = [w.url for w in workers]
        direct = measure_direct(workers, seconds, latency)
        # Both routers get the same cache_aware parameters (radixfleet's defaults).
        cache_flags = ["--cache-threshold", "0.5", "--balance-abs-threshold", "32", "--balance-rel-threshold", "1.0001"]
        port = free_port()
        procs.append(start([sys.executable, "-m", "radixfleet", "router", "--port", str(port), "--policy", "cache_aware",
                            "--log-level", "warning", "--worker-urls", *urls, *cache_flags], f"http://127.0.0.1:{port}/health"))
        wait_workers(port, 2)
        ours = measure("radixfleet", port, seconds, latency, direct)
        stop(procs.pop())
        summary = {"bench": "summary", "worker_latency_s": latency, "radixfleet_added_p50_ms_c1": ours["added_p50_ms_c1"],
                   "goal_added_p50_ms": 1.0}
        if sglang_python is not None:
            port, prom = free_port(), free_port()
            procs.append(start([str(sglang_python), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom), "--policy", "cache_aware",
                                "--log-level", "warn", "--worker-urls", *urls, *cache_flags], f"http://127.0.0.1:{port}/health",
                               cwd=CACHE_DIR))
            theirs = measure("sglang_router", port, seconds, latency, direct)
            summary.update(sglang_added_p50_ms_c1=theirs["added_p50_ms_c1"],
                           radixfleet_vs_sglang_req_per_s_c32=round(ours["c32"]["req_per_s"] / theirs["c32"]["req_per_s"], 3),
                           goal_ratio=0.7)
        emit(**summary, load_average_1m=round(os.getloadavg()[0], 2))
    finally:
        for p in procs:
            stop(p)
        for w in workers:
            w.kill()


def measure_direct(workers: list[FakeWorkerProcess], seconds: float, latency: float) -> dict:
    """The same load straight to the workers (half the connections each): the no-router baseline."""

    async def both(concurrency: int, secs: float) -> dict:
        halves = await asyncio.gather(*(load(w.port, max(1, concurrency // 2), plain_body, secs, 1_000_000) for w in workers))
        lat = {k: statistics.fmean(h[k] for h in halves) for k in ("p50_ms", "p99_ms")}
        return {"requests": sum(h["requests"] for h in halves), "req_per_s": round(sum(h["req_per_s"] for h in halves), 1),
                "p50_ms": round(lat["p50_ms"], 3), "p99_ms": round(lat["p99_ms"], 3)}

    c1 = asyncio.run(load(workers[0].port, 1, plain_body, seconds / 2, 100_000))
    c32 = asyncio.run(both(32, seconds))
    record = {"bench": "direct", "worker_latency_s": latency, "c1": c1, "c32": c32}
    emit(**record)
    return record


def wait_workers(port: int, n: int, timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(httpx.get(f"http://127.0.0.1:{port}/list_workers", trust_env=False).json()["urls"]) == n:
            return
        time.sleep(0.1)
    raise TimeoutError(f"router on {port} never listed {n} workers")


if __name__ == "__main__":
    sys.exit(main())
