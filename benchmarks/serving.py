"""Online serving benchmark against a running server (modelled on SGLang's bench_serving).

Sends ``--num-prompts`` streaming requests, arriving as a Poisson process at
``--request-rate`` (``inf``: all at once) and/or capped at ``--max-concurrency`` in flight,
and prints one JSON line: TTFT, ITL, TPOT and E2E latency (mean/p50/p90/p99, ms), request and
token throughput, and the prompt tokens the server reported as cached
(``total_cached_tokens``) and so computed (``prefill_tokens_computed``).

Prompts: ``random`` (random token ids; exact lengths with the native backend) or
``shared-prefix`` (``--gsp-num-groups`` system prompts, each shared by
``--gsp-prompts-per-group`` questions: the radix cache case). Output lengths are exact
(``ignore_eos``).

    radixfleet serve --model-path smollm2 --port 30000 &
    python benchmarks/serving.py --base-url http://127.0.0.1:30000 --num-prompts 32 \\
        --random-input-len 256 --random-output-len 64 --max-concurrency 8

Measured 2026-11-23 on the 2-core CPU dev machine (SmolLM2-135M fp32, default server flags,
load average 2.5-4 from other jobs: figures are noisy, +-30%):

    in x out (prompts, concurrency)          out tok/s  total tok/s  TTFT p50/p99 ms  ITL p50/p99 ms
    random 16x64 (16, c=16)                      107        134          662/666        139/228
    random 256x32 (32, c=8)                       28        250         3964/4323       163/219
    shared-prefix 4 groups x 8, 512+32 x16 (c=8)  22        781          916/6995       201/2014
    random 512x16 (32, c=8), cache flushed         9        306         6508/11462      203/5770
    openai-chat 64x32 (24, 2 req/s Poisson)       47        187          345/506        166/1603
    openai completions 64x64 (1, c=1)             17         34           67/67          59/62

The offline ``Engine.generate`` on the same 16x64 batch gave 119-141 output tok/s in the
same conditions (the server's HTTP/SSE layer and the client share the 2 cores).

Requests on one new context sent at once (README, prefill-time caching):
``--dataset-name shared-prefix --gsp-num-groups 1 --gsp-prompts-per-group 8
--gsp-system-prompt-len 800 --gsp-question-len 16 --gsp-output-len 16 --flush-cache``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class Prompt:
    input_ids: list[int]
    text: str
    output_len: int


@dataclass
class Result:
    ok: bool
    prompt_len: int = 0
    output_len: int = 0
    cached: int = 0  # prompt tokens the server reported reused from its prefix cache
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


# ---- prompts ------------------------------------------------------------------------------------
def _random_ids(rng: random.Random, n: int, vocab: int, special: set[int]) -> list[int]:
    ids = []
    while len(ids) < n:
        t = rng.randrange(vocab)
        if t not in special:
            ids.append(t)
    return ids


def _lengths(rng: random.Random, mean: int, ratio: float, n: int) -> list[int]:
    lo = max(int(mean * ratio), 1)
    return [rng.randint(lo, mean) for _ in range(n)]


def random_prompts(tok, args, rng: random.Random) -> list[Prompt]:
    special = set(tok.all_special_ids)
    ins = _lengths(rng, args.random_input_len, args.random_range_ratio, args.num_prompts)
    outs = _lengths(rng, args.random_output_len, args.random_range_ratio, args.num_prompts)
    prompts = []
    for n_in, n_out in zip(ins, outs):
        ids = _random_ids(rng, n_in, tok.vocab_size, special)
        prompts.append(Prompt(ids, tok.decode(ids), n_out))
    return prompts


def shared_prefix_prompts(tok, args, rng: random.Random) -> list[Prompt]:
    special = set(tok.all_special_ids)
    prompts = []
    for _ in range(args.gsp_num_groups):
        system = _random_ids(rng, args.gsp_system_prompt_len, tok.vocab_size, special)
        for _ in range(args.gsp_prompts_per_group):
            ids = system + _random_ids(rng, args.gsp_question_len, tok.vocab_size, special)
            prompts.append(Prompt(ids, tok.decode(ids), args.gsp_output_len))
    rng.shuffle(prompts)
    return prompts


DATASETS = {"random": random_prompts, "shared-prefix": shared_prefix_prompts}


# ---- one request per backend ----------------------------------------------------------------------
def _request(args, p: Prompt) -> tuple[str, dict]:
    if args.backend == "native":
        return "/generate", {"input_ids": p.input_ids, "stream": True, "sampling_params": {
            "temperature": 0, "max_new_tokens": p.output_len, "ignore_eos": True}}
    common = {"model": args.model, "max_tokens": p.output_len, "temperature": 0, "stream": True,
              "ignore_eos": True, "stream_options": {"include_usage": True}}
    if args.backend == "openai":
        return "/v1/completions", {**common, "prompt": p.text}
    return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": p.text}]}


def _tokens_in(args, chunk: dict) -> int:
    """Output tokens carried by one SSE chunk (an OpenAI chunk carries one token at most)."""
    if args.backend == "native":
        return len(chunk.get("output_ids", []))
    choices = chunk.get("choices") or []
    return int(bool(choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content"))))


async def send(client: httpx.AsyncClient, args, p: Prompt) -> Result:
    path, body = _request(args, p)
    res = Result(ok=False, prompt_len=len(p.input_ids))
    start = last = time.perf_counter()
    tokens = 0
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    return res
                if chunk.get("usage"):  # OpenAI backends: the server's own token counts
                    tokens = max(tokens, chunk["usage"]["completion_tokens"])
                    res.prompt_len = chunk["usage"]["prompt_tokens"]
                    res.cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                res.cached = (chunk.get("meta_info") or {}).get("cached_tokens", res.cached)
                n = _tokens_in(args, chunk)
                if not n:
                    continue
                now = time.perf_counter()
                if res.ttft == 0.0:
                    res.ttft = now - start
                else:
                    res.itl += [(now - last) / n] * n
                last = now
                res.output_len += n
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.output_len = max(res.output_len, tokens)
    res.e2e = time.perf_counter() - start
    res.ok = True
    return res


async def run(args, prompts: list[Prompt]) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.base_url, timeout=None, limits=limits, headers=headers) as client:
        for p in prompts[:args.warmup_requests]:
            warm = await send(client, args, Prompt(p.input_ids, p.text, min(p.output_len, 4)))
            if not warm.ok:
                raise SystemExit(f"warm-up request failed: {warm.error}")
        if args.flush_cache:  # after the warm-up, which would otherwise cache a shared prefix
            (await client.post("/flush_cache")).raise_for_status()
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        rng = np.random.default_rng(args.seed)

        async def one(p: Prompt) -> Result:
            if sem is None:
                return await send(client, args, p)
            async with sem:
                return await send(client, args, p)

        tasks = []
        start = time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(one(p)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _stats(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values) * scale
    return {"mean": round(float(a.mean()), 2),
            **{f"p{q}": round(float(np.percentile(a, q)), 2) for q in (50, 90, 99)}}


def summarize(args, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    summary = {
        "benchmark": "serving", "backend": args.backend, "dataset": args.dataset_name,
        "base_url": args.base_url, "num_prompts": args.num_prompts,
        "request_rate": None if args.request_rate == float("inf") else args.request_rate,
        "max_concurrency": args.max_concurrency, "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": round(duration, 3),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        # Prompt tokens the server computed: those it did not report as cached.
        "total_cached_tokens": sum(r.cached for r in ok),
        "prefill_tokens_computed": in_tokens - sum(r.cached for r in ok),
        "request_throughput": round(len(ok) / duration, 3),
        "input_throughput": round(in_tokens / duration, 2),
        "output_throughput": round(out_tokens / duration, 2),
        "total_token_throughput": round((in_tokens + out_tokens) / duration, 2),
        "concurrency": round(sum(r.e2e for r in ok) / duration, 2),
    }
    for name, values in (("ttft_ms", [r.ttft for r in ok]), ("itl_ms", [x for r in ok for x in r.itl]),
                         ("tpot_ms", tpot), ("e2e_ms", [r.e2e for r in ok])):
        for k, v in _stats(values).items():
            summary[f"{k}_{name}"] = v
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        summary["errors"] = errors[:5]
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--backend", choices=("native", "openai", "openai-chat"), default="native",
                   help="native: POST /generate with input_ids; openai: /v1/completions; "
                        "openai-chat: /v1/chat/completions")
    p.add_argument("--model", default=None, help="model name for the OpenAI backends (default: from /v1/models)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the server's /get_model_info)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset-name", choices=sorted(DATASETS), default="random")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=1.0,
                   help="lengths are drawn from [len * ratio, len] (1.0: exactly len)")
    p.add_argument("--gsp-num-groups", type=int, default=4)
    p.add_argument("--gsp-prompts-per-group", type=int, default=8)
    p.add_argument("--gsp-system-prompt-len", type=int, default=512)
    p.add_argument("--gsp-question-len", type=int, default=32)
    p.add_argument("--gsp-output-len", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--flush-cache", action="store_true",
                   help="POST /flush_cache after the warm-up, before the measured requests")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-file", default=None, help="also append the JSON line to this file")
    args = p.parse_args(argv)
    if args.dataset_name == "shared-prefix":
        args.num_prompts = args.gsp_num_groups * args.gsp_prompts_per_group
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    info = httpx.get(args.base_url + "/get_model_info", headers=headers, timeout=30).json()
    tok = AutoTokenizer.from_pretrained(args.tokenizer or info["tokenizer_path"])
    if args.model is None:
        args.model = httpx.get(args.base_url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    prompts = DATASETS[args.dataset_name](tok, args, random.Random(args.seed))
    results, duration = asyncio.run(run(args, prompts))
    line = json.dumps(summarize(args, results, duration))
    print(line, flush=True)
    if args.output_file:
        with open(args.output_file, "a") as f:
            f.write(line + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
