"""CPU matmuls of one decode step: ``F.linear`` against the oneDNN-prepacked weights the
engine uses on CPU (``engine/layers/linear.py``), at the default model's shapes.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_matmul.py --rows 1 16 64
    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_matmul.py --rows 1 16 64 --dtype bfloat16

Prints one JSON line per row count: ms for every layer matmul of a step (qkv, o, gate_up,
down × layers) and for the LM head, both ways, and the largest difference between the two.
Random weights of the model's shapes (read from its config), so no weights are loaded.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from radixfleet.engine.layers.linear import matmul, pack_weight
from radixfleet.engine.models.model_config import ModelConfig
from radixfleet.engine.models.model_prep import resolve_model_path


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default="smollm2")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    cfg = ModelConfig.from_path(resolve_model_path(args.model_path))
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = [((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h), (h, cfg.num_heads * d), (2 * i, h), (h, i)]
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    layers = [[(torch.randn(o, k) * 0.02).to(dtype) for o, k in shapes] for _ in range(cfg.num_layers)]
    packed = [[pack_weight(w) for w in layer] for layer in layers]
    head = (torch.randn(cfg.vocab_size, h) * 0.02).to(dtype)
    head_packed = pack_weight(head)
    for rows in args.rows:
        row = measure(rows, layers, packed, head, head_packed, args.repeats)
        print(json.dumps({"benchmark": "cpu_matmul", "model": args.model_path, "dtype": args.dtype, **row}),
              flush=True)


def measure(rows: int, layers, packed, head, head_packed, repeats: int) -> dict:
    x = {w.shape[1]: torch.randn(rows, w.shape[1]).to(head.dtype) for w in layers[0]}
    xh = torch.randn(rows, head.shape[1]).to(head.dtype)

    def step(use_packed: bool) -> None:
        for ws, ps in zip(layers, packed, strict=True):
            for w, pw in zip(ws, ps, strict=True):
                matmul(x[w.shape[1]], w, None, pw if use_packed else None)

    diff = max((F.linear(x[w.shape[1]], w) - matmul(x[w.shape[1]], w, None, pw)).abs().max().float().item()
               for w, pw in zip(layers[0], packed[0], strict=True))
    with torch.inference_mode():
        return {"rows": rows, "threads": torch.get_num_threads(),
                "layers_f_linear_ms": round(timed(lambda: step(False), repeats), 2),
                "layers_onednn_prepacked_ms": round(timed(lambda: step(True), repeats), 2),
                "lm_head_f_linear_ms": round(timed(lambda: F.linear(xh, head), repeats), 2),
                "lm_head_onednn_prepacked_ms": round(timed(lambda: matmul(xh, head, None, head_packed), repeats), 2),
                "max_abs_diff": diff}


if __name__ == "__main__":
    main()
