"""The fused MoE kernels (``kernels/fused_moe.py``) alone: one MoE layer's experts at several
token counts, against the torch loop over experts (``engine/layers/moe.py:moe_torch``), with
the bandwidth the fused path reaches on the weights it must read (the distinct experts
chosen) and the activations. CUDA only.

    python benchmarks/moe_kernel.py                        # Qwen3-30B-A3B's experts, bf16
    python benchmarks/moe_kernel.py --experts 8 --top-k 2 --hidden 4096 --inter 14336  # Mixtral
    python benchmarks/moe_kernel.py --tune                 # also search the GEMM block sizes per token count
    python benchmarks/moe_kernel.py --one-token-graph      # batch-1 variants as a decode step runs them

``--one-token-graph``: one token through ``--layers`` distinct layers' experts (so that the
weights come from HBM, not L2), captured in a CUDA graph and replayed, for each one-token
variant (the grouped GEMM; the two GEMVs with routing inside the gate_up programs or first)
and each block configuration: microseconds per layer and the
bandwidth on the ``k`` experts' bytes. Eager timings of one call measure the launches.

Prints one JSON line per token count (routing included: router logits → output). With
``--tune``, each line also has the best grouped-GEMM block sizes found, and a last line holds
them as a ``RADIXFLEET_MOE_CONFIGS`` value for this shape (the one-token GEMVs' blocks:
``--one-token-graph``).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch


def timed_ms(fn, reps: int = 50) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn()`` after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def candidates() -> list[tuple[int, ...]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) to try."""
    out = []
    for bm, bn, bk, warps, stages in itertools.product((16, 32, 64, 128), (64, 128, 256), (64, 128), (4, 8),
                                                       (3, 4)):
        if bm * bn >= 16384 and warps == 4 or bm * bn <= 2048 and warps == 8:
            continue
        out.append((bm, bn, bk, 1 if bm == 16 else 8, warps, stages))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768, help="each expert's intermediate size (per TP rank)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048, 8192])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--one-token-graph", action="store_true", help="only the CUDA-graph one-token sweep")
    p.add_argument("--layers", type=int, default=8, help="distinct layers in the one-token graph")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "moe_kernel", "skipped": "needs CUDA: no CUDA GPU visible to torch"}))
        return
    dtype = getattr(torch, args.dtype)
    E, k, H, inter = args.experts, args.top_k, args.hidden, args.inter
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.one_token_graph:
        one_token_graph(E, k, H, inter, dtype, args.layers, gen)
        return
    w13 = torch.randn(E, 2 * inter, H, device="cuda", dtype=dtype, generator=gen) * H ** -0.5
    w2 = torch.randn(E, H, inter, device="cuda", dtype=dtype, generator=gen) * inter ** -0.5
    table = []
    for T in args.tokens:
        row = bench_tokens(T, w13, w2, k, args.tune, gen)
        row = {"bench": "moe_kernel", "device": torch.cuda.get_device_name(), "dtype": args.dtype, **row}
        if args.tune:
            table.append([T, row["tuned_config"]])
        print(json.dumps(row), flush=True)
    if table:
        table[-1][0] = 1 << 62
        print(json.dumps({"bench": "moe_kernel_tuned", "RADIXFLEET_MOE_CONFIGS":
                          json.dumps({f"{args.experts},{2 * args.inter},{args.hidden}": table})}), flush=True)


def bench_tokens(T: int, w13: torch.Tensor, w2: torch.Tensor, k: int, tune: bool, gen) -> dict:
    """One layer's experts on ``T`` random tokens with random router logits."""
    from radixfleet.engine.layers.moe import moe_torch, select_experts
    from radixfleet.kernels import fused_moe as fm

    E, two_i, H = w13.shape
    x = torch.randn(T, H, device="cuda", dtype=w13.dtype, generator=gen)
    logits = torch.randn(T, E, device="cuda", dtype=w13.dtype, generator=gen)

    def fused(config=None):
        routed = fm.route_and_align(logits, k, True, two_i, H) if config is None else None
        if routed is not None:
            weights, ids, cfg, aligned = routed
            return fm.fused_moe(x, w13, w2, weights, ids, cfg, aligned)
        weights, ids = select_experts(logits, k, True)
        return fm.fused_moe(x, w13, w2, weights, ids, config)

    def loop():
        weights, ids = select_experts(logits, k, True)
        return moe_torch(x, w13, w2, weights, ids)

    distinct = int(torch.unique(select_experts(logits, k, True)[1]).numel())
    read = distinct * (w13[0].numel() + w2[0].numel()) * w13.element_size() + 2 * x.numel() * x.element_size()
    fused_ms, loop_ms = timed_ms(fused), timed_ms(loop, reps=10)
    row = {"experts": E, "top_k": k, "hidden": H, "inter": two_i // 2, "tokens": T,
           "config": list(fm.moe_config(T, E, two_i, H)), "distinct_experts": distinct,
           "read_mb": round(read / 1e6, 2), "fused_ms": round(fused_ms, 4),
           "fused_tb_per_s": round(read / fused_ms / 1e9, 3), "torch_loop_ms": round(loop_ms, 4),
           "speedup_over_torch_loop": round(loop_ms / fused_ms, 2)}
    if T == 1:  # batch-1 decode: the one-token GEMM and the two GEMVs (the engine's default)
        from radixfleet.kernels import moe_gemv

        def gemm1():
            return fm.fused_moe_one_token(x, w13, w2, logits, k, True)

        def gemv(routed: bool):
            def run():
                saved, moe_gemv.ROUTE_SEPARATELY = moe_gemv.ROUTE_SEPARATELY, routed
                try:
                    return moe_gemv.moe_one_token(x, w13, w2, logits, k, True)
                finally:
                    moe_gemv.ROUTE_SEPARATELY = saved
            return run

        gemv1, gemv1_routed = gemv(False), gemv(True)

        for name, fn in (("one_token_gemm", gemm1), ("one_token_gemv", gemv1),
                         ("one_token_gemv_routed_first", gemv1_routed)):
            ms = timed_ms(fn)
            row[f"{name}_ms"], row[f"{name}_tb_per_s"] = round(ms, 4), round(read / ms / 1e9, 3)
    if tune:
        best = min(((timed_ms(lambda c=c: fused(c), reps=10), c) for c in candidates() if _runs(fused, c)),
                   key=lambda t: t[0])
        row["tuned_ms"], row["tuned_config"] = round(best[0], 4), list(best[1])
    return row


def graph_us(fn, reps: int = 20) -> float:
    """Median microseconds of one replay of ``fn`` captured in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed_ms(graph.replay, reps) * 1e3


def one_token_graph(E: int, k: int, H: int, inter: int, dtype, layers: int, gen) -> None:
    """See the module docstring (``--one-token-graph``)."""
    from radixfleet.kernels import fused_moe as fm
    from radixfleet.kernels import moe_gemv

    device = torch.cuda.get_device_name()
    ws = [(torch.randn(E, 2 * inter, H, device="cuda", dtype=dtype, generator=gen) * H ** -0.5,
           torch.randn(E, H, inter, device="cuda", dtype=dtype, generator=gen) * inter ** -0.5)
          for _ in range(layers)]
    xs = [torch.randn(1, H, device="cuda", dtype=dtype, generator=gen) for _ in range(layers)]
    logits = [torch.randn(1, E, device="cuda", dtype=dtype, generator=gen) for _ in range(layers)]
    read = k * (ws[0][0][0].numel() + ws[0][1][0].numel()) * ws[0][0].element_size()

    def step(one_token):
        def run():
            for (w13, w2), x, lg in zip(ws, xs, logits):
                one_token(x, w13, w2, lg, k, True)
        return run

    def emit(variant, config, us_total):
        us = us_total / layers
        print(json.dumps({"bench": "moe_one_token_graph", "device": device, "experts": E, "top_k": k,
                          "hidden": H, "inter": inter, "layers": layers, "variant": variant,
                          "config": config, "us_per_layer": round(us, 2),
                          "tb_per_s": round(read / us / 1e6, 3)}), flush=True)
        return us

    emit("gemm", None, graph_us(step(fm.fused_moe_one_token)))
    names = ("ROUTE_SEPARATELY", "GATE_UP_CONFIG", "DOWN_CONFIG")
    saved = {n: getattr(moe_gemv, n) for n in names}
    best = {}
    try:
        for routed in (False, True):
            moe_gemv.ROUTE_SEPARATELY = routed
            variant = "gemv_routed_first" if routed else "gemv"
            # the gate_up config with the down one as it is, then the down one with the best gate_up
            for name in ("GATE_UP_CONFIG", "DOWN_CONFIG"):
                times = []
                for config in itertools.product((1, 2, 4, 8), (2, 4, 8)):
                    setattr(moe_gemv, name, config)
                    try:
                        us = graph_us(step(moe_gemv.moe_one_token))
                    except Exception as e:  # too many registers for the row block
                        if "resource" not in str(e).lower():
                            raise
                        continue
                    config_now = {"GATE_UP_CONFIG": list(moe_gemv.GATE_UP_CONFIG),
                                  "DOWN_CONFIG": list(moe_gemv.DOWN_CONFIG)}
                    times.append((emit(variant, config_now, us), config))
                setattr(moe_gemv, name, min(times)[1])
            best[variant] = {"us_per_layer": round(min(times)[0], 2), "GATE_UP_CONFIG": list(moe_gemv.GATE_UP_CONFIG),
                             "DOWN_CONFIG": list(moe_gemv.DOWN_CONFIG)}
            for n in ("GATE_UP_CONFIG", "DOWN_CONFIG"):
                setattr(moe_gemv, n, saved[n])
    finally:
        for n, v in saved.items():
            setattr(moe_gemv, n, v)
    print(json.dumps({"bench": "moe_one_token_graph_best", "device": device, "read_mb_per_layer": round(read / 1e6, 2),
                      **best}), flush=True)


def _runs(fn, config) -> bool:
    """False for block sizes the GPU cannot run (out of shared memory)."""
    try:
        fn(config)
        return True
    except Exception as e:  # triton's OutOfResources and compile errors differ by version
        if "resource" in str(e).lower() or "shared memory" in str(e).lower():
            return False
        raise


if __name__ == "__main__":
    main()
