"""Constrained (xgrammar JSON schema) vs unconstrained decoding, same engine, same run.

Batch of 16 requests, each decoding exactly ``--tokens`` tokens in both modes: the schema
needs at least 40 array items, so it never completes early, and the unconstrained
requests ignore EOS. Rounds alternate between the modes; the figure is the median
wall time per generated token. Prints JSON lines:

    python benchmarks/structured.py [--batch 16 --tokens 64 --rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from radixfleet.engine.engine import Engine

SCHEMA = {"type": "array", "minItems": 40, "items": {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 10},
                   "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 2}},
    "required": ["id", "name", "tags"]}}
PROMPTS = [f"Record set {i}: a JSON list of users with ids, names and colour tags.\n" for i in range(64)]


def run_round(engine: Engine, batch: int, tokens: int, constrained: bool, seed: int) -> dict:
    params = {"temperature": 0.7, "seed": seed, "max_new_tokens": tokens}
    if constrained:
        params["json_schema"] = json.dumps(SCHEMA)
    else:
        params["ignore_eos"] = True
    prompts = PROMPTS[:batch]
    engine.generate(prompts, {"max_new_tokens": 1})  # prompts cached: time the decode
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    generated = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {"wall_s": wall, "tokens": generated, "ms_per_token": 1000 * wall / generated,
            "finish": sorted({o["meta_info"]["finish_reason"]["type"] for o in outs})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    engine = Engine(model_path=args.model, max_total_tokens=16384)
    try:
        for constrained in (False, True):  # warm-up (and the one grammar compilation)
            run_round(engine, args.batch, 8, constrained, seed=0)
        results: dict[bool, list[dict]] = {False: [], True: []}
        for r in range(args.rounds):
            for constrained in ((False, True) if r % 2 == 0 else (True, False)):
                res = run_round(engine, args.batch, args.tokens, constrained, seed=r)
                results[constrained].append(res)
                print(json.dumps({"bench": "structured_round", "round": r, "constrained": constrained,
                                  "batch": args.batch, **res}), flush=True)
        base = statistics.median(x["ms_per_token"] for x in results[False])
        cons = statistics.median(x["ms_per_token"] for x in results[True])
        print(json.dumps({
            "bench": "structured", "device": "cpu", "cpus": os.cpu_count(), "batch": args.batch,
            "tokens_per_request": args.tokens, "rounds": args.rounds,
            "unconstrained_ms_per_token": round(base, 3), "constrained_ms_per_token": round(cons, 3),
            "overhead_pct": round(100 * (cons / base - 1), 2),
            "load_avg_1m": os.getloadavg()[0]}), flush=True)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
