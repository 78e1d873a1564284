"""Soak: a bounded mixed workload through a router over real engines, then leak checks.

Starts ``radixfleet router`` and ``--workers`` ``radixfleet serve`` engines (CPU, default
model) on loopback, and sends ``--requests`` requests, ``--concurrency`` at a time: native
``/generate`` and OpenAI completions / chat, streaming or not, batches, ``n`` > 1, and
structured output (JSON schema, regex); ``--cancel-ratio`` of them are cancelled by the
client at a random point (the stream closed after a few chunks, or the request task cancelled).
Every answer not cancelled is checked (shape, finish reason, text; a JSON schema answer parses,
a regex answer matches). Afterwards, on every engine: ``/metrics`` running and queued gauges
read 0, ``/flush_cache`` succeeds, and ``/get_server_info`` shows every KV slot and table row
free again (``free_tokens`` == ``max_total_tokens``); the resident memory of each engine's
processes (server + scheduler + detokenizer) is compared between the middle and the end.

``--kill-engine-at F`` SIGKILLs engine 0 once a fraction F of the requests was sent, waits
until the router drops it, restarts it on its port, adds it back with ``/add_worker`` and
checks that it is sent requests again (issue #20 item 2a): non-streaming requests must not
fail; a stream cut after its first byte cannot be retried and is counted as ``broken_streams``.

    python benchmarks/soak.py [--requests 2000] [--workers 2] [--concurrency 16]

Prints JSON lines: one ``engine`` line per engine (slots leaked, table rows leaked,
retractions, RSS at the middle and the end and the growth, in MiB) and a ``summary`` line (sent, completed,
failed, cancelled, broken_streams, elapsed_s, failures: up to 5 examples).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from radixfleet.engine.server.metric_names import PREFIX

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_process import SERVER_ARGS, free_port, wait_ok  # noqa: E402

JSON_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
               "additionalProperties": False}
REGEX = r"(yes|no)"
TOPICS = ["the sea", "a red fox", "prime numbers", "Paris", "a rainy day", "tea", "robots", "the moon"]
# Shared system prompts so the radix cache matches prefixes across requests.
SYSTEMS = [f"You are helper {g}. " + " ".join(f"Rule {g}.{i}: be brief." for i in range(8)) for g in range(3)]


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    broken_streams: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.failed += 1
        if len(self.failures) < 5:
            self.failures.append(what[:300])


class Invalid(Exception):
    """An answer whose shape or content is wrong."""


# ---- the workload -------------------------------------------------------------------------------
def make_request(rng: random.Random, i: int, max_new: int) -> tuple[str, dict, str]:
    """(route, body, kind) of request ``i``; ``kind`` says how to check the answer."""
    topic = rng.choice(TOPICS)
    stream = rng.random() < 0.5
    params = {"max_new_tokens": max_new, "temperature": rng.choice([0.0, 0.7])}
    kind = rng.choice(["native", "native", "batch", "n2", "regex", "completions", "chat", "chat", "json"])
    system = rng.choice(SYSTEMS)
    if kind == "native":
        return "/generate", {"text": f"{system} Write about {topic}.", "sampling_params": params, "stream": stream}, kind
    if kind == "batch":
        return "/generate", {"text": [f"{system} Item {i}: {topic}", f"Tell me about {topic}."],
                             "sampling_params": params, "stream": stream}, kind
    if kind == "n2":
        return "/generate", {"text": f"Two ideas about {topic}:", "stream": stream,
                             "sampling_params": {**params, "n": 2, "temperature": 0.8}}, kind
    if kind == "regex":
        return "/generate", {"text": f"Is {topic} blue? Answer yes or no:", "stream": stream,
                             "sampling_params": {**params, "regex": REGEX}}, kind
    if kind == "completions":
        return "/v1/completions", {"model": "default", "prompt": f"{system} A line about {topic}:", "stream": stream,
                                   "max_tokens": max_new, "temperature": params["temperature"],
                                   "n": rng.choice([1, 1, 2])}, kind
    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Say something about {topic}."}]
    body = {"model": "default", "messages": messages, "stream": stream, "max_tokens": max_new,
            "temperature": params["temperature"]}
    if kind == "json":
        body["max_tokens"] = 4 * max_new  # room for the whole object
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": JSON_SCHEMA}}
    return "/v1/chat/completions", body, kind


def check_native(out: dict, kind: str) -> None:
    finish = out["meta_info"]["finish_reason"]["type"]
    if finish not in ("stop", "length") or not isinstance(out["text"], str):
        raise Invalid(f"finish_reason {finish!r}, text {out['text']!r}")
    if out["meta_info"]["completion_tokens"] < 1 and finish == "length":
        raise Invalid(f"finish length with no token: {out}")
    if kind == "regex" and finish == "stop" and not re.fullmatch(REGEX, out["text"]):
        raise Invalid(f"regex answer {out['text']!r} does not match {REGEX}")


def check_choice(text: str, finish: str, kind: str) -> None:
    if finish not in ("stop", "length") or not isinstance(text, str):
        raise Invalid(f"finish_reason {finish!r}, text {text!r}")
    if finish == "length" and not text:
        raise Invalid("finish length with empty text")
    if kind == "json" and finish == "stop":
        answer = json.loads(text)
        if not isinstance(answer.get("answer"), int):
            raise Invalid(f"JSON answer {text!r} does not follow the schema")


def check_answer(route: str, body: dict, kind: str, answer) -> None:
    """Raise ``Invalid`` unless ``answer`` (the merged response) is complete and well formed."""
    if route == "/generate":
        outs = answer if isinstance(answer, list) else [answer]
        want = 2 if kind in ("batch", "n2") else 1
        if len(outs) != want:
            raise Invalid(f"{len(outs)} answers, expected {want}")
        for out in outs:
            check_native(out, kind)
        return
    choices = answer["choices"]
    if len(choices) != body.get("n", 1):
        raise Invalid(f"{len(choices)} choices, expected {body.get('n', 1)}")
    for c in choices:
        text = c["text"] if route == "/v1/completions" else c["message"]["content"]
        check_choice(text, c["finish_reason"], kind)


def merge_stream(route: str, events: list[dict]):
    """The answer a stream adds up to, in the non-streaming shape."""
    if route == "/generate":
        by_index: dict[int, dict] = {}
        for e in events:
            acc = by_index.setdefault(e.get("index", 0), {"text": ""})
            acc["text"] += e["text"]
            acc["meta_info"] = e["meta_info"]
        outs = [by_index[i] for i in sorted(by_index)]
        return outs if len(outs) > 1 else outs[0]
    choices: dict[int, dict] = {}
    for e in events:
        for c in e.get("choices", []):
            acc = choices.setdefault(c["index"], {"index": c["index"], "text": "", "finish_reason": None})
            acc["text"] += c.get("text") or (c.get("delta") or {}).get("content") or ""
            acc["finish_reason"] = c.get("finish_reason") or acc["finish_reason"]
    if route == "/v1/chat/completions":
        return {"choices": [{"message": {"content": c["text"]}, "finish_reason": c["finish_reason"]}
                            for c in choices.values()]}
    return {"choices": list(choices.values())}


async def one_request(c: httpx.AsyncClient, base: str, route: str, body: dict, kind: str,
                      cancel_after: int | None, tally: Tally) -> None:
    """Send, read, check; ``cancel_after``: leave after that many stream chunks (or, not
    streaming, cancel the task after that many tenths of a second)."""
    if not body.get("stream"):
        work = asyncio.ensure_future(c.post(base + route, json=body))
        if cancel_after is not None:
            done, _ = await asyncio.wait({work}, timeout=cancel_after / 10)
            if not done:
                work.cancel()
                tally.cancelled += 1
                return
        try:
            resp = await work
        except httpx.HTTPError as e:
            return tally.fail(f"{route} {kind}: {type(e).__name__}: {e}")
        if resp.status_code != 200:
            return tally.fail(f"{route} {kind}: HTTP {resp.status_code} {resp.text}")
        try:
            check_answer(route, body, kind, resp.json())
        except (Invalid, KeyError, TypeError, ValueError) as e:
            return tally.fail(f"{route} {kind}: {e}")
        tally.completed += 1
        return
    events, done, got_bytes = [], False, False
    try:
        async with c.stream("POST", base + route, json=body) as resp:
            if resp.status_code != 200:
                return tally.fail(f"{route} {kind} stream: HTTP {resp.status_code} {(await resp.aread())!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                got_bytes = True
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return tally.fail(f"{route} {kind} stream error: {event['error']}")
                events.append(event)
                if cancel_after is not None and len(events) >= cancel_after:
                    tally.cancelled += 1
                    return  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as e:
        if got_bytes:
            tally.broken_streams += 1
            return
        return tally.fail(f"{route} {kind} stream: {type(e).__name__}: {e}")
    if not done:
        tally.broken_streams += 1  # cut after its first byte (a worker died): not retryable
        return
    try:
        check_answer(route, body, kind, merge_stream(route, events))
    except (Invalid, KeyError, TypeError, ValueError) as e:
        return tally.fail(f"{route} {kind} stream: {e}")
    tally.completed += 1


# ---- the fleet ----------------------------------------------------------------------------------
@dataclass
class EngineProc:
    port: int
    extra: list[str]
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> EngineProc:
        cmd = [sys.executable, "-m", "radixfleet", "serve", "--model-path", "smollm2", "--host", "127.0.0.1",
               "--port", str(self.port), *SERVER_ARGS, *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        return self

    def rss_mib(self) -> float:
        """Resident memory of the server and its engine processes."""
        root = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20

    def kill(self) -> None:
        """SIGKILL the server and its engine processes."""
        root = psutil.Process(self.proc.pid)
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            p.kill()
        psutil.wait_procs(procs, timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def start_router(port: int, urls: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "radixfleet", "router", "--port", str(port), "--worker-urls", *urls,
           "--health-check-interval", "1", "--worker-startup-timeout", "120", "--log-level", "warning"]
    return subprocess.Popen(cmd)


async def list_workers(c: httpx.AsyncClient, router: str) -> list[str]:
    return (await c.get(router + "/list_workers")).json()["urls"]


async def wait_workers(c: httpx.AsyncClient, router: str, want: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while set(await list_workers(c, router)) != want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"router workers {await list_workers(c, router)} never became {sorted(want)}")
        await asyncio.sleep(0.2)


async def engine_state(c: httpx.AsyncClient, url: str) -> dict:
    info = (await c.get(url + "/get_server_info")).json()
    return {**info["internal_states"][0], "max_total_tokens": info["max_total_tokens"]}


async def settle(c: httpx.AsyncClient, url: str, timeout: float = 30.0) -> dict:
    """Wait until ``/metrics`` shows no running or queued request (cancellations are async)."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = {}
        for line in (await c.get(url + "/metrics")).text.splitlines():
            for name in ("num_running_requests", "num_queued_requests"):
                if line.startswith(f"{PREFIX}{name}{{"):
                    gauges[name] = float(line.rsplit(" ", 1)[1])
        if (gauges and not any(gauges.values())) or time.monotonic() > deadline:
            return gauges
        await asyncio.sleep(0.2)


async def leak_report(c: httpx.AsyncClient, engine: EngineProc, rows_free_at_start: int) -> dict:
    gauges = await settle(c, engine.url)
    flush = await c.post(engine.url + "/flush_cache")
    state = await engine_state(c, engine.url)
    return {"metrics_running": gauges.get("num_running_requests"), "metrics_queued": gauges.get("num_queued_requests"),
            "flush_status": flush.status_code, "running": state["num_running_requests"],
            "queued": state["num_queued_requests"], "slots_leaked": state["max_total_tokens"] - state["free_tokens"],
            "rows_leaked": rows_free_at_start - state["req_rows_free"], "retractions": state["retractions"]}


# ---- the run ------------------------------------------------------------------------------------
async def kill_and_readd(c: httpx.AsyncClient, router: str, engine: EngineProc, others: list[str]) -> dict:
    """Issue #20 item 2a: SIGKILL, wait until the router drops it, restart, /add_worker."""
    t0 = time.monotonic()
    engine.kill()
    await wait_workers(c, router, set(others), 60)
    dropped_s = time.monotonic() - t0
    engine.start()
    await asyncio.to_thread(wait_ok, engine.url + "/health", 180, engine.proc)
    resp = await c.post(router + "/add_worker", params={"url": engine.url}, timeout=200)
    return {"dropped_after_s": round(dropped_s, 1), "readd_status": resp.status_code,
            "back_after_s": round(time.monotonic() - t0, 1)}


async def run(args: argparse.Namespace) -> int:
    extra = ["--chunked-prefill-size", str(args.chunked_prefill_size), "--max-total-tokens", str(args.max_total_tokens)]
    engines = [EngineProc(free_port(), extra).start() for _ in range(args.workers)]
    router_port = free_port()
    router = f"http://127.0.0.1:{router_port}"
    router_proc = start_router(router_port, [e.url for e in engines])
    rng = random.Random(args.seed)
    tally = Tally()
    records: list[dict] = []
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=300,
                                     limits=httpx.Limits(max_connections=args.concurrency + 8)) as c:
            for e in engines:
                await asyncio.to_thread(wait_ok, e.url + "/health", 300, e.proc)
            await wait_workers(c, router, {e.url for e in engines}, 120)
            rows_free = {e.url: (await engine_state(c, e.url))["req_rows_free"] for e in engines}
            rss_mid: dict[str, float] = {}
            fault: dict = {}
            kill_at = None if args.kill_engine_at is None else int(args.kill_engine_at * args.requests)
            sem = asyncio.Semaphore(args.concurrency)
            tasks: list[asyncio.Task] = []
            t0 = time.monotonic()
            for i in range(args.requests):
                await sem.acquire()
                if i == args.requests // 2:
                    rss_mid = {e.url: e.rss_mib() for e in engines}
                if i == kill_at:
                    fault = await kill_and_readd(c, router, engines[0], [e.url for e in engines[1:]])
                route, body, kind = make_request(rng, i, args.max_new_tokens)
                cancel_after = rng.randint(1, 4) if rng.random() < args.cancel_ratio else None
                task = asyncio.create_task(one_request(c, router, route, body, kind, cancel_after, tally))
                task.add_done_callback(lambda _: sem.release())
                tasks.append(task)
                tally.sent += 1
            await asyncio.gather(*tasks)
            elapsed = time.monotonic() - t0
            for e in engines:
                record = {"bench": "engine", "url": e.url, **await leak_report(c, e, rows_free[e.url])}
                if e is engines[0] and fault:
                    served = (await c.get(e.url + "/metrics")).text
                    record["requests_after_restart"] = sum(
                        float(line.rsplit(" ", 1)[1]) for line in served.splitlines()
                        if line.startswith(PREFIX + "requests_total{"))
                    record.update(fault)
                else:
                    end = e.rss_mib()
                    record.update(rss_mid_mib=round(rss_mid.get(e.url, end), 1), rss_end_mib=round(end, 1),
                                  rss_growth_mib=round(end - rss_mid.get(e.url, end), 1))
                records.append(record)
                emit(**record)
    finally:
        router_proc.terminate()
        for e in engines:
            e.stop()
        router_proc.wait(30)
    emit(bench="summary", requests=args.requests, workers=args.workers, concurrency=args.concurrency,
         sent=tally.sent, completed=tally.completed, failed=tally.failed, cancelled=tally.cancelled,
         broken_streams=tally.broken_streams, slots_leaked=sum(r["slots_leaked"] for r in records),
         elapsed_s=round(elapsed, 1), failures=tally.failures)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--cancel-ratio", type=float, default=0.1)
    parser.add_argument("--chunked-prefill-size", type=int, default=64,
                        help="small, so the longer prompts are prefilled in chunks")
    parser.add_argument("--max-total-tokens", type=int, default=8192,
                        help="KV slots per engine; a small pool makes the scheduler retract requests")
    parser.add_argument("--kill-engine-at", type=float, default=None,
                        help="SIGKILL engine 0 after this fraction of the requests, restart and re-add it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.kill_engine_at is not None and args.workers < 2:
        parser.error("--kill-engine-at needs --workers 2 or more")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
