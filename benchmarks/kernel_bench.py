"""Kernel benchmarks; prints one JSON line per measurement (GPU name in every line).

    python benchmarks/kernel_bench.py [--sweep] [--out FILE] [--only launch ...]

Needs a CUDA GPU (and triton, ``pip install -e .[gpu]``); elsewhere it prints one JSON line
saying so (``"skipped"``) and exits 0.

- decode attention at the Llama-3.1-8B shape (32 heads, 8 kv heads, head dim 128), batch
  1/32/128, context 1k/4k: median time per layer call (eager, and replayed from a CUDA graph
  as the engine runs decode), achieved HBM bandwidth over the bytes that must move (K and V
  of every context token, the slot table, q and out) against the measured 3.05 TB/s.
  Each timed call reads a different layer's KV buffers (at least 256 MB in rotation) so that
  small contexts are not served from the 50 MB L2.
- extend attention: TFLOP/s (4 * H * D * visible (query, key) pairs), and torch's SDPA on the
  same causal no-prefix shapes for scale.
- rmsnorm / rotary / silu-and-mul / kv store: achieved bandwidth.
- gemv: batch-1 projections, cuBLAS vs kernels/gemv.py, and the separate norm / activation
  kernels + projection vs the GEMV with them folded in; rotary_store: rotary + KV store in
  two launches vs one. ``--only gemv_sweep`` / ``gemv_fp8_sweep``: every whole-row GEMV
  block configuration at those shapes, bf16 or fp8 weights (``_rows_config``'s data).
- sliding window (``--only window``; Mistral v0.1's 4096 at the Llama shape): decode at 16k
  / 32k contexts and a 16k-token extend, windowed against full attention on the same data;
  decode's bandwidth counts the bytes of the window only.
- ``--sweep``: decode and extend tile configurations.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import time

import torch
import torch.nn.functional as F

if torch.cuda.is_available():  # triton and the kernels: GPU installs only; main() says so elsewhere
    import triton

    from radixfleet.kernels.activation import silu_and_mul
    from radixfleet.kernels.decode_attention import choose_num_kv_splits, decode_attention
    from radixfleet.kernels.extend_attention import default_extend_config, extend_attention
    from radixfleet.kernels.kv_store import store_kv
    from radixfleet.kernels.rmsnorm import fused_add_rmsnorm
    from radixfleet.kernels.rotary import apply_rotary_, build_cos_sin_cache

HBM_ROOFLINE = 3.05e12  # bytes/s, measured on the H100 80GB HBM3 (read)
H, KVH, D = 32, 8, 128  # Llama-3.1-8B attention shape
DTYPE = torch.bfloat16
ROTATION_BYTES = 256 << 20

_out_file = None


def emit(record: dict) -> None:
    line = json.dumps({"gpu": torch.cuda.get_device_name(), **record})
    print(line, flush=True)
    if _out_file is not None:
        _out_file.write(line + "\n")
        _out_file.flush()


def bench(fn, graph: bool = False) -> float:
    """Median milliseconds of ``fn`` (optionally replayed from a CUDA graph)."""
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


class DecodeCase:
    """``layers`` KV buffers with B requests of ``ctx`` tokens in shuffled slots."""

    def __init__(self, B: int, ctx: int):
        self.B, self.ctx = B, ctx
        per_layer = B * ctx * KVH * D * 2 * 2
        self.layers = max(1, min(64, math.ceil(ROTATION_BYTES / per_layer)))
        slots = B * ctx + 1
        self.k = [torch.randn(slots, KVH, D, device="cuda", dtype=DTYPE) for _ in range(self.layers)]
        self.v = [torch.randn(slots, KVH, D, device="cuda", dtype=DTYPE) for _ in range(self.layers)]
        self.req_to_token = (torch.randperm(B * ctx, device="cuda") + 1).int().view(B, ctx)
        self.req_pool_indices = torch.arange(B, device="cuda")
        self.seq_lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        self.q = torch.randn(B, H, D, device="cuda", dtype=DTYPE)
        self.out = torch.empty_like(self.q)
        self.bytes = per_layer + B * ctx * 4 + 2 * self.q.numel() * 2

    def fn(self, **kw):
        splits = kw.pop("num_kv_splits", None) or choose_num_kv_splits(self.B, KVH, self.q.device)
        mid_o = torch.empty(self.B, H, splits, D, dtype=torch.float32, device="cuda")
        mid_lse = torch.empty(self.B, H, splits, dtype=torch.float32, device="cuda")
        semaphore = torch.zeros(self.B * KVH, dtype=torch.int32, device="cuda")

        def run():
            for layer in range(self.layers):
                decode_attention(self.q, self.k[layer], self.v[layer], self.req_to_token,
                                 self.req_pool_indices, self.seq_lens, D ** -0.5, out=self.out,
                                 num_kv_splits=splits, mid_o=mid_o, mid_lse=mid_lse,
                                 semaphore=semaphore, **kw)
        return run, splits


def bench_decode(sweep: bool) -> None:
    for B in (1, 32, 128):
        for ctx in (1024, 4096):
            case = DecodeCase(B, ctx)
            run, splits = case.fn()
            for graph in (False, True):
                ms = bench(run, graph) / case.layers
                emit({"bench": "decode_attention", "batch": B, "context": ctx, "heads": H,
                      "kv_heads": KVH, "head_dim": D, "num_kv_splits": splits,
                      "cuda_graph": graph, "us": round(ms * 1e3, 2),
                      "bytes": case.bytes, "tb_per_s": round(case.bytes / ms / 1e9, 3),
                      "roofline_frac": round(case.bytes / ms / 1e9 / (HBM_ROOFLINE / 1e12), 3)})
            if sweep and ctx == 4096:
                for block_n in (32, 64, 128):
                    for num_warps in (4, 8):
                        for num_stages in (2, 3):
                            run, splits = case.fn(block_n=block_n, num_warps=num_warps,
                                                  num_stages=num_stages)
                            ms = bench(run, graph=True) / case.layers
                            emit({"bench": "decode_sweep", "batch": B, "context": ctx,
                                  "block_n": block_n, "num_warps": num_warps,
                                  "num_stages": num_stages, "num_kv_splits": splits,
                                  "us": round(ms * 1e3, 2),
                                  "tb_per_s": round(case.bytes / ms / 1e9, 3)})
                for splits in (1, 2, 4, 8, 16, 32, 64):
                    run, _ = case.fn(num_kv_splits=splits)
                    ms = bench(run, graph=True) / case.layers
                    emit({"bench": "decode_splits", "batch": B, "context": ctx,
                          "num_kv_splits": splits, "us": round(ms * 1e3, 2),
                          "tb_per_s": round(case.bytes / ms / 1e9, 3)})
            del case
            torch.cuda.empty_cache()


def _extend_case(B: int, ext: int, prefix: int):
    seq = prefix + ext
    k = torch.randn(B * seq + 1, KVH, D, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    req_to_token = (torch.randperm(B * seq, device="cuda") + 1).int().view(B, seq)
    q = torch.randn(B * ext, H, D, device="cuda", dtype=DTYPE)
    i32 = dict(dtype=torch.int32, device="cuda")
    args = (q, k, v, req_to_token, torch.arange(B, device="cuda"),
            torch.arange(B, **i32) * ext, torch.full((B,), prefix, **i32),
            torch.full((B,), ext, **i32), ext, D ** -0.5)
    flops = 4 * H * D * B * (ext * prefix + ext * (ext + 1) / 2)
    return args, flops


EXTEND_SHAPES = [(1, 4096, 0), (4, 1024, 0), (8, 512, 1536), (1, 2048, 6144), (16, 256, 0)]


def bench_extend(sweep: bool) -> None:
    for B, ext, prefix in EXTEND_SHAPES:
        args, flops = _extend_case(B, ext, prefix)
        configs = [default_extend_config(D, ext, args[0].device)]
        if sweep:
            configs += [(128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 2),
                        (128, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3),
                        (64, 32, 4, 2), (64, 32, 4, 3), (64, 128, 4, 2)]
        for i, config in enumerate(dict.fromkeys(configs)):
            ms = bench(lambda a=args, c=config: extend_attention(*a, config=c))
            emit({"bench": "extend_attention" if i == 0 else "extend_sweep", "batch": B,
                  "extend": ext, "prefix": prefix, "heads": H, "kv_heads": KVH, "head_dim": D,
                  "config": list(config), "ms": round(ms, 4),
                  "tflop_per_s": round(flops / ms / 1e9, 1)})
        if prefix == 0:
            q = args[0].view(B, ext, H, D).transpose(1, 2)
            kk = torch.randn(B, KVH, ext, D, device="cuda", dtype=DTYPE)
            vv = torch.randn_like(kk)
            ms = bench(lambda q=q, kk=kk, vv=vv: F.scaled_dot_product_attention(
                q, kk, vv, is_causal=True, enable_gqa=True))
            emit({"bench": "torch_sdpa_causal", "batch": B, "extend": ext, "prefix": 0,
                  "ms": round(ms, 4), "tflop_per_s": round(flops / ms / 1e9, 1)})


WINDOW = 4096


def bench_window() -> None:
    for B in (1, 32):
        for ctx in (16384, 32768):
            case = DecodeCase(B, ctx)
            for window in (None, WINDOW):
                run, splits = case.fn(window=window)
                ms = bench(run, graph=True) / case.layers
                tokens = B * min(ctx, window or ctx)
                need = tokens * KVH * D * 2 * 2 + tokens * 4 + 2 * case.q.numel() * 2
                emit({"bench": "decode_attention_window", "batch": B, "context": ctx, "window": window,
                      "num_kv_splits": splits, "us": round(ms * 1e3, 2),
                      "tb_per_s": round(need / ms / 1e9, 3),
                      "roofline_frac": round(need / ms / 1e9 / (HBM_ROOFLINE / 1e12), 3)})
            del case
            torch.cuda.empty_cache()
    B, ext = 1, 16384
    args, _ = _extend_case(B, ext, 0)
    for window in (None, WINDOW):
        ms = bench(lambda w=window: extend_attention(*args, window=w))
        pairs = sum(min(i + 1, window or ext) for i in range(ext))  # visible (query, key) pairs
        emit({"bench": "extend_attention_window", "batch": B, "extend": ext, "window": window,
              "ms": round(ms, 4), "tflop_per_s": round(4 * H * D * B * pairs / ms / 1e9, 1)})


def bench_small() -> None:
    T, N, inter = 4096, 4096, 14336
    x = torch.randn(T, N, device="cuda", dtype=DTYPE)
    r = torch.randn_like(x)
    w = torch.randn(N, device="cuda", dtype=DTYPE)
    ms = bench(lambda: fused_add_rmsnorm(x, r, w, 1e-5))
    emit({"bench": "fused_add_rmsnorm", "tokens": T, "hidden": N, "us": round(ms * 1e3, 2),
          "tb_per_s": round(4 * x.numel() * 2 / ms / 1e9, 3)})
    g = torch.randn(T, 2 * inter, device="cuda", dtype=DTYPE)
    ms = bench(lambda: silu_and_mul(g))
    emit({"bench": "silu_and_mul", "tokens": T, "intermediate": inter, "us": round(ms * 1e3, 2),
          "tb_per_s": round(3 * T * inter * 2 / ms / 1e9, 3)})
    cache = build_cos_sin_cache(D, 131072, 500000.0, {"rope_type": "llama3", "factor": 8.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}, device="cuda")
    qkv = torch.randn(T, (H + 2 * KVH) * D, device="cuda", dtype=DTYPE)
    q, k = qkv[:, :H * D].view(T, H, D), qkv[:, H * D:(H + KVH) * D].view(T, KVH, D)
    pos = torch.randint(0, 131072, (T,), device="cuda")
    ms = bench(lambda: apply_rotary_(pos, q, k, cache))
    emit({"bench": "rotary", "tokens": T, "us": round(ms * 1e3, 2),
          "tb_per_s": round(2 * T * (H + KVH) * D * 2 / ms / 1e9, 3)})
    kbuf = torch.empty(1 << 20, KVH, D, device="cuda", dtype=DTYPE)
    vbuf = torch.empty_like(kbuf)
    loc = torch.randperm(1 << 20, device="cuda")[:T]
    kv = qkv[:, H * D:].view(T, 2, KVH, D)
    ms = bench(lambda: store_kv(kv[:, 0], kv[:, 1], kbuf, vbuf, loc))
    emit({"bench": "store_kv", "tokens": T, "us": round(ms * 1e3, 2),
          "tb_per_s": round(2 * 2 * T * KVH * D * 2 / ms / 1e9, 3)})


def _rotating(fn, x, weights):
    """A call of ``fn(x, w)`` that takes the next of ``weights`` each time."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(weights)
        return fn(x, weights[state["i"]])

    return call


def bench_gemv() -> None:
    """Batch-1 linear layers at the Llama-3.1-8B shapes: cuBLAS (F.linear) against
    kernels/gemv.py's two kernels (``rows``: whole rows, x made once per program; ``kloop``:
    K walked in chunks), each timed over enough weight copies (>= 256 MB) that reads come
    from HBM, replayed from a CUDA graph. Then what the decoder layer runs at batch 1,
    separate kernels against one fused launch: RMSNorm (+ residual add) then the projection
    vs ``gemv_rmsnorm`` (qkv, gate_up), SiLU-mul then the down projection vs
    ``gemv_silu_mul``."""
    from radixfleet.kernels import gemv as gemv_mod
    from radixfleet.kernels.gemv import gemv, gemv_rmsnorm, gemv_silu_mul

    def kernel(fn, rows: bool):
        def call(*args):
            saved = gemv_mod.ROWS_MAX_K
            gemv_mod.ROWS_MAX_K = saved if rows else 0
            try:
                return fn(*args)
            finally:
                gemv_mod.ROWS_MAX_K = saved
        return call

    shapes = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
              "down_proj": (4096, 14336), "lm_head": (128256, 4096)}
    hidden, res, norm_w = (torch.randn(1, 4096, device="cuda", dtype=DTYPE) for _ in range(3))
    norm_w = norm_w[0]
    for name, (n, k) in shapes.items():
        copies = max(2, -(-ROTATION_BYTES // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=DTYPE)
        impls = {"cublas": F.linear, "gemv_rows": kernel(gemv, True), "gemv_kloop": kernel(gemv, False)}
        if name in ("qkv_proj", "gate_up_proj"):
            impls["rmsnorm+cublas"] = lambda _, w: F.linear(fused_add_rmsnorm(hidden, res, norm_w)[0], w)
            for variant in ("rows", "kloop"):
                impls[f"gemv_rmsnorm_{variant}"] = kernel(
                    lambda _, w: gemv_rmsnorm(hidden, res, norm_w, 1e-5, w), variant == "rows")
        if name == "down_proj":
            gate_up = torch.randn(1, 2 * k, device="cuda", dtype=DTYPE)
            impls["silu+cublas"] = lambda _, w, g=gate_up: F.linear(silu_and_mul(g), w)
            for variant in ("rows", "kloop"):
                impls[f"gemv_silu_mul_{variant}"] = kernel(
                    lambda _, w, g=gate_up: gemv_silu_mul(g, w), variant == "rows")
        for impl, fn in impls.items():
            ms = bench(_rotating(fn, x, ws), graph=True)
            emit({"bench": "gemv", "layer": name, "n": n, "k": k, "impl": impl, "us": round(ms * 1e3, 2),
                  "tb_per_s": round(n * k * 2 / ms / 1e9, 3)})
        del ws


# The whole-row GEMV configurations the sweep tries: (BLOCK_N, warps, programs per SM; 0 = one
# program per row block).
GEMV_ROWS_CANDIDATES = [
    (1, 4, 0), (2, 4, 0), (2, 8, 0), (4, 8, 0), (1, 8, 0), (4, 4, 0),
    (1, 4, 8), (2, 4, 4), (2, 4, 8), (2, 8, 2), (2, 8, 4), (4, 8, 2), (1, 8, 4), (4, 4, 4),
    (1, 8, 1), (1, 8, 2), (1, 16, 1), (1, 16, 2), (2, 16, 1), (2, 8, 1), (4, 16, 1),
]
# fp8 weights are one byte: twice the rows in the same registers keep as many bytes in flight.
GEMV_FP8_EXTRA_CANDIDATES = [(4, 8, 4), (4, 4, 8), (8, 8, 1), (8, 8, 2), (8, 4, 4), (8, 16, 1), (4, 16, 2),
                             (4, 8, 1), (4, 8, 2), (2, 16, 2)]


def bench_gemv_sweep(fp8: bool = False, layers: list[str] | None = None) -> None:
    """Every whole-row GEMV configuration (``GEMV_ROWS_CANDIDATES`` whose weight tile stays
    within 128 elements per thread, 256 for fp8) on what the Llama-3.1-8B decoder layer runs at batch 1,
    fused prologues included: the data behind ``kernels/gemv.py: _rows_config``. ``fp8``
    (``--only gemv_fp8_sweep``): fp8 e4m3 weights with per-row scales (``quantization="fp8"``)."""
    from radixfleet.engine.layers.fp8 import quantize_rows
    from radixfleet.kernels import gemv as gemv_mod
    from radixfleet.kernels.gemv import (
        PLAIN,
        RMSNORM,
        SILU_MUL,
        gemv,
        gemv_rmsnorm,
        gemv_silu_mul,
    )

    hidden, res, norm_w = (torch.randn(1, 4096, device="cuda", dtype=DTYPE) for _ in range(3))
    norm_w = norm_w[0]

    # w: a weight, or (fp8 weight, scale)
    def args(w):
        return (w[0], None) if fp8 else (w, None)

    def scale(w):
        return w[1] if fp8 else None

    def normed(_, w):
        return gemv_rmsnorm(hidden, res, norm_w, 1e-5, *args(w), w_scale=scale(w))

    def plain(x, w):
        return gemv(x, *args(w), w_scale=scale(w))

    def silu(x, w):
        return gemv_silu_mul(x, *args(w), w_scale=scale(w))

    cases = {"qkv_proj+rmsnorm": (6144, 4096, RMSNORM, normed), "o_proj": (4096, 4096, PLAIN, plain),
             "gate_up_proj+rmsnorm": (28672, 4096, RMSNORM, normed),
             "down_proj+silu_mul": (4096, 14336, SILU_MUL, silu)}
    elem = 1 if fp8 else 2
    saved_packed = gemv_mod.FP8_PACKED
    try:
        for name, (n, k, prologue, fn) in cases.items():
            if layers and name.split("+")[0] not in layers:
                continue
            copies = max(2, -(-ROTATION_BYTES // (n * k * elem)))
            ws = [torch.randn(n, k, device="cuda", dtype=DTYPE) * 0.02 for _ in range(copies)]
            if fp8:
                ws = [quantize_rows(w) for w in ws]
            x = torch.randn(1, 2 * k if prologue == SILU_MUL else k, device="cuda", dtype=DTYPE)
            gemv_mod.ROWS_OVERRIDE = None
            default = gemv_mod._rows_config(n, k, prologue, fp8)
            block_k = triton.next_power_of_2(k)
            candidates = GEMV_ROWS_CANDIDATES + (GEMV_FP8_EXTRA_CANDIDATES if fp8 else [])
            for config, packed in itertools.product(candidates, (True, False) if fp8 else (None,)):
                block_n, warps, _ = config
                if block_n * block_k > (256 if fp8 else 128) * 32 * warps:  # elements per thread
                    continue
                gemv_mod.ROWS_OVERRIDE, gemv_mod.FP8_PACKED = config, packed
                ms = bench(_rotating(fn, x, ws), graph=True)
                emit({"bench": "gemv_fp8_sweep" if fp8 else "gemv_sweep", "layer": name, "n": n, "k": k,
                      "block_n": block_n, "warps": warps, "per_sm": config[2], "default": config == default,
                      **({"f16_pairs": packed} if fp8 else {}),
                      "us": round(ms * 1e3, 2), "tb_per_s": round(n * k * elem / ms / 1e9, 3)})
            del ws
    finally:
        gemv_mod.ROWS_OVERRIDE, gemv_mod.FP8_PACKED = None, saved_packed


def bench_rotary_store() -> None:
    """Rotary then the KV store (two launches) vs ``rotary_store_kv_`` at batch 1 and 64,
    Llama-3.1-8B heads, replayed from a CUDA graph."""
    from radixfleet.kernels.rotary import rotary_store_kv_

    cache = build_cos_sin_cache(D, 8192, 500000.0, device="cuda")
    kbuf = torch.zeros(100_000, KVH, D, device="cuda", dtype=DTYPE)
    vbuf = torch.zeros_like(kbuf)

    def separate(pos, q, k, v, loc):
        apply_rotary_(pos, q, k, cache)
        store_kv(k, v, kbuf, vbuf, loc)

    def fused(pos, q, k, v, loc):
        rotary_store_kv_(pos, q, k, v, cache, kbuf, vbuf, loc)

    for T in (1, 64):
        qkv = torch.randn(T, (H + 2 * KVH) * D, device="cuda", dtype=DTYPE)
        args = (torch.randint(0, 8192, (T,), device="cuda"),
                *(t.view(T, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], -1)),
                torch.randperm(100_000, device="cuda")[:T])
        for impl, fn in (("rotary+store_kv", separate), ("rotary_store_kv", fused)):
            emit({"bench": "rotary_store", "tokens": T, "impl": impl,
                  "us": round(bench(functools.partial(fn, *args), graph=True) * 1e3, 2)})


def bench_launch() -> None:
    """Host microseconds per call with tiny inputs (the eager-mode floor per kernel call)."""
    x = torch.randn(1, 4096, device="cuda", dtype=DTYPE)
    w = torch.randn(4096, device="cuda", dtype=DTYPE)
    case = DecodeCase(1, 64)
    case.layers = 1
    decode, _ = case.fn()
    calls = {"fused_add_rmsnorm": lambda: fused_add_rmsnorm(x, x, w, 1e-5),
             "decode_attention": decode,
             "torch_add": lambda: torch.add(x, x)}
    for name, fn in calls.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host_us = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        emit({"bench": "launch_overhead", "call": name, "host_us_per_call": round(host_us, 2)})


def main() -> None:
    global _out_file
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep tile configurations")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    parser.add_argument("--gemv-layers", nargs="+", help="the GEMV sweeps: only these layers (qkv_proj, "
                        "o_proj, gate_up_proj, down_proj)")
    parser.add_argument("--only", choices=["decode", "extend", "small", "gemv", "gemv_sweep", "gemv_fp8_sweep",
                                           "rotary_store", "launch", "window"], action="append")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "kernel_bench", "skipped": "needs CUDA: no CUDA GPU visible to torch"}),
              flush=True)
        return
    _out_file = open(args.out, "a") if args.out else None  # noqa: SIM115
    only = set(args.only or ["decode", "extend", "small", "gemv", "rotary_store", "launch", "window"])
    torch.manual_seed(0)
    if "decode" in only:
        bench_decode(args.sweep)
    if "extend" in only:
        bench_extend(args.sweep)
    if "small" in only:
        bench_small()
    if "gemv" in only:
        bench_gemv()
    if "gemv_sweep" in only:
        bench_gemv_sweep(layers=args.gemv_layers)
    if "gemv_fp8_sweep" in only:
        bench_gemv_sweep(fp8=True, layers=args.gemv_layers)
    if "rotary_store" in only:
        bench_rotary_store()
    if "launch" in only:
        bench_launch()
    if "window" in only:
        bench_window()


if __name__ == "__main__":
    main()
