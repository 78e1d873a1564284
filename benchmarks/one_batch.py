"""Static-batch latency: a prefill of ``batch × input_len`` tokens (in forwards of at most
8192 tokens, or one request), then ``output_len`` decode steps, straight through the ModelRunner (no scheduler, no IPC).

    python benchmarks/one_batch.py --model-path llama-3.1-8b --load-format dummy \
        --batch-size 1 8 64 --input-len 512 --output-len 64
    python benchmarks/one_batch.py --model-path smollm2 --load-format auto --batch-size 1 16  # CPU
    python benchmarks/one_batch.py --quantization fp8 --batch-size 1 32 64  # fp8 weights (CUDA)

Prints one JSON line per batch size: prefill ms; decode ms/step and tok/s, first with the
host waiting for each step before building the next (p50), then pipelined as the engine's
overlap schedule runs decode (the next step built while this one runs; mean); and for CUDA
the roofline of a decode step at the measured HBM bandwidth: streaming the weights, and the
weights plus the batch's KV cache. "Streamed" bytes leave out the input embedding table
(a step reads one row of it per token) unless it is also the LM head: that is the
roofline a decode step can reach. For mixture-of-experts models what a step reads is less
(``read_*``): the experts chosen (top-k per layer at batch 1; the expected distinct experts
under uniform routing above), attention, norms, routers, the LM head and the batch's
embedding rows. ``--moe-torch-reference`` adds, in the same run, rows with the experts
looped over in torch (``RADIXFLEET_MOE_TORCH=1``; without CUDA graphs, as that loop syncs
with the host):

    python benchmarks/one_batch.py --model-path qwen3-30b-a3b --load-format dummy \
        --batch-size 1 8 64 --input-len 512 --output-len 64 --moe-torch-reference
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from radixfleet import env_vars
from radixfleet.engine.config import EngineConfig
from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode
from radixfleet.engine.executor.model_runner import ModelRunner
from radixfleet.engine.layers import moe
from radixfleet.engine.memory.kv_pool import KVPool
from radixfleet.engine.models.model_prep import resolve_model_path

PREFILL_TOKENS = 8192


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure_hbm_tb_per_s(dev: torch.device, gib: int = 4) -> float:
    """Device-to-device copy bandwidth (bytes read + written), best of 10 copies."""
    src = torch.empty(gib << 28, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(12):
        sync(dev)
        t = time.perf_counter()
        dst.copy_(src)
        sync(dev)
        best = min(best, time.perf_counter() - t)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / best / 1e12


def batch_for(runner: ModelRunner, rows: list[int], ids: torch.Tensor, start: int, n: int,
              mode: ForwardMode) -> ForwardBatch:
    """Requests ``rows`` compute tokens [start, start + n) of ``ids`` ([B, L])."""
    bs = len(rows)
    slots = runner.allocator.alloc(bs * n)
    assert slots is not None, "KV pool too small for the benchmark"
    for i, r in enumerate(rows):
        runner.req_table.write(r, start, slots[i * n:(i + 1) * n])
    # Uploads through pinned memory, queued on the stream (as the engine's step executor does):
    # building the next step's batch does not wait for the step still running.
    return ForwardBatch.from_host(mode, ids[:, start:start + n].reshape(-1), rows, slots,
                                  runner.req_table.table, [start] * bs, [n] * bs)


def prefill(runner: ModelRunner, rows: list[int], ids: torch.Tensor, in_len: int) -> None:
    """Prefill every row's first ``in_len`` tokens, as few rows per forward as keep it within
    ``PREFILL_TOKENS`` (the engine's GPU chunk), so large batches fit next to the KV pool."""
    per = max(1, PREFILL_TOKENS // in_len)
    for i in range(0, len(rows), per):
        hidden = runner.forward(batch_for(runner, rows[i:i + per], ids[i:i + per], 0, in_len, ForwardMode.EXTEND))
        runner.compute_logits(hidden).argmax(-1)


def run_one(runner: ModelRunner, bs: int, in_len: int, out_len: int) -> dict:
    dev = runner.device
    vocab = runner.model_config.vocab_size
    ids = torch.randint(100, vocab - 100, (bs, in_len + 2 * out_len))
    rows = [runner.req_table.alloc() for _ in range(bs)]
    sync(dev)
    t0 = time.perf_counter()
    prefill(runner, rows, ids, in_len)
    sync(dev)
    prefill_s = time.perf_counter() - t0
    steps = []
    for k in range(out_len):
        batch = batch_for(runner, rows, ids, in_len + k, 1, ForwardMode.DECODE)
        sync(dev)
        t = time.perf_counter()
        runner.compute_logits(runner.forward(batch)).argmax(-1).tolist()  # host sync, as serving does
        steps.append(time.perf_counter() - t)
    # Then out_len more steps pipelined as the engine's overlap schedule runs them: the next
    # step's batch is built on the host while this step runs on the device.
    start = in_len + out_len
    batch = batch_for(runner, rows, ids, start, 1, ForwardMode.DECODE)
    sync(dev)
    t = time.perf_counter()
    for k in range(out_len):
        tokens = runner.compute_logits(runner.forward(batch)).argmax(-1)
        if k + 1 < out_len:
            batch = batch_for(runner, rows, ids, start + k + 1, 1, ForwardMode.DECODE)
        tokens.tolist()
    piped = (time.perf_counter() - t) / out_len
    for r in rows:
        runner.allocator.free(runner.req_table.read(r, in_len + 2 * out_len))
        runner.req_table.free(r)
    steps.sort()
    step = steps[len(steps) // 2]
    return {"batch_size": bs, "input_len": in_len, "output_len": out_len,
            "prefill_ms": round(prefill_s * 1e3, 2), "prefill_tok_per_s": round(bs * in_len / prefill_s, 1),
            "decode_ms_per_step_p50": round(step * 1e3, 3), "decode_tok_per_s": round(bs / step, 1),
            "decode_ms_per_step_pipelined": round(piped * 1e3, 3),
            "decode_tok_per_s_pipelined": round(bs / piped, 1)}


def profile_decode(runner: ModelRunner, bs: int, in_len: int, steps: int = 8) -> dict:
    """Device time per decode step by kernel name (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    dev = runner.device
    ids = torch.randint(100, runner.model_config.vocab_size - 100, (bs, in_len + steps + 2))
    rows = [runner.req_table.alloc() for _ in range(bs)]
    prefill(runner, rows, ids, in_len)
    runner.forward(batch_for(runner, rows, ids, in_len, 1, ForwardMode.DECODE))
    sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for k in range(steps):
            runner.compute_logits(runner.forward(
                batch_for(runner, rows, ids, in_len + 1 + k, 1, ForwardMode.DECODE))).argmax(-1)
        sync(dev)
    for r in rows:
        runner.allocator.free(runner.req_table.read(r, in_len + steps + 1))
        runner.req_table.free(r)
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name[:90]
            calls, us = kernels.get(name, (0, 0.0))
            kernels[name] = (calls + 1, us + e.device_time)
    total = sum(us for _, us in kernels.values()) / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]
    return {"batch_size": bs, "kernel_us_per_step": round(total, 1),
            "kernels": [{"name": n, "calls_per_step": c / steps, "us_per_step": round(us / steps, 1)}
                        for n, (c, us) in top]}


def expert_bytes(model: torch.nn.Module, bs: int) -> tuple[int, float]:
    """(bytes of every MoE expert's weights, bytes of the experts a decode step of ``bs``
    requests reads: ``top_k`` per layer at batch 1, ``E (1 - (1 - k/E)^bs)`` expected distinct
    experts under uniform routing above)."""
    total, active = 0, 0.0
    for m in model.modules():
        if isinstance(m, moe.FusedMoE):
            size = m.w13.numel() * m.w13.element_size() + m.w2.numel() * m.w2.element_size()
            total += size
            active += size * (1 - (1 - m.top_k / m.num_experts) ** bs)
    return total, active


def read_roofline(row: dict, read_bytes: float, hbm: float) -> dict:
    """The row's decode times against streaming ``read_bytes`` at ``hbm`` TB/s."""
    ms = read_bytes / (hbm * 1e12) * 1e3
    return {"read_gb_per_step": round(read_bytes / 1e9, 3), "read_roofline_ms_per_step": round(ms, 3),
            "fraction_of_read_roofline": round(ms / row["decode_ms_per_step_p50"], 3),
            "fraction_of_read_roofline_pipelined": round(ms / row["decode_ms_per_step_pipelined"], 3)}


def run_moe_torch_reference(runner: ModelRunner, bs: int, in_len: int, out_len: int) -> dict:
    """``run_one`` with the MoE experts looped over in torch and CUDA graphs off."""
    graphs, runner.cuda_graphs = runner.cuda_graphs, None
    os.environ[env_vars.MOE_TORCH.name] = "1"
    moe._fused_moe.cache_clear()
    try:
        return run_one(runner, bs, in_len, out_len)
    finally:
        del os.environ[env_vars.MOE_TORCH.name]
        moe._fused_moe.cache_clear()
        runner.cuda_graphs = graphs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default="llama-3.1-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--quantization", default=None, choices=["fp8"], help="fp8: fp8 linear weights")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"])
    p.add_argument("--moe-torch-reference", action="store_true",
                   help="MoE models: also run each batch size with the experts looped over in torch")
    p.add_argument("--profile", action="store_true",
                   help="also print each batch size's device time per decode step by kernel (CUDA)")
    p.add_argument("--hbm-tb-per-s", type=float, default=None,
                   help="HBM bandwidth for the roofline (default: measured here with a device copy)")
    args = p.parse_args()
    max_bs = max(args.batch_size)
    config = EngineConfig(model_path=args.model_path, load_format=args.load_format, dtype=args.dtype,
                          max_total_tokens=max_bs * (args.input_len + 2 * args.output_len) + 1024,
                          max_running_requests=max_bs, attention_backend=args.attention_backend,
                          disable_cuda_graph=args.disable_cuda_graph, cuda_graph_max_bs=max_bs,
                          skip_tokenizer_init=True, quantization=args.quantization,
                          kv_cache_dtype=args.kv_cache_dtype)
    hbm = None
    if torch.cuda.is_available():
        hbm = args.hbm_tb_per_s or measure_hbm_tb_per_s(torch.device("cuda"))
    runner = ModelRunner(config, resolve_model_path(args.model_path))
    weight_bytes = sum(t.numel() * t.element_size() for t in runner.model.parameters())
    embed = runner.model.embed_tokens.weight
    tied = embed is runner.model.lm_head.weight
    streamed_bytes = weight_bytes - (0 if tied else embed.numel() * embed.element_size())
    device = torch.cuda.get_device_name() if runner.device.type == "cuda" else "cpu"
    run_one(runner, 1, 16, 4)  # warm-up
    for bs in args.batch_size:
        row = {"benchmark": "one_batch", "device": device, "model": args.model_path,
               "dtype": str(runner.dtype).removeprefix("torch."),
               "quantization": args.quantization, "kv_cache_dtype": str(runner.kv_dtype).removeprefix("torch."),
               "attention_backend": type(runner.attn_backend).__name__,
               "cuda_graph": runner.cuda_graphs is not None, "weight_gb": round(weight_bytes / 1e9, 2),
               "streamed_gb": round(streamed_bytes / 1e9, 2),
               **run_one(runner, bs, args.input_len, args.output_len)}
        if runner.device.type == "cuda":
            roof_ms = weight_bytes / (hbm * 1e12) * 1e3
            row["hbm_tb_per_s"] = round(hbm, 2)
            row["roofline_ms_per_step"] = round(roof_ms, 3)
            row["fraction_of_roofline"] = round(roof_ms / row["decode_ms_per_step_p50"], 3)
            row["fraction_of_roofline_pipelined"] = round(roof_ms / row["decode_ms_per_step_pipelined"], 3)
            streamed_ms = streamed_bytes / (hbm * 1e12) * 1e3
            row["streamed_roofline_ms_per_step"] = round(streamed_ms, 3)
            row["fraction_of_streamed_roofline_pipelined"] = round(
                streamed_ms / row["decode_ms_per_step_pipelined"], 3)
            # Large batches also stream their KV: mean context over the measured steps.
            attn = runner.model.layers[0].self_attn
            kv_bytes = bs * (args.input_len + args.output_len) * KVPool.bytes_per_token(
                runner.model_config.num_layers, attn.num_kv_heads, runner.model_config.head_dim, runner.kv_dtype)
            roof_kv_ms = (weight_bytes + kv_bytes) / (hbm * 1e12) * 1e3
            row["roofline_with_kv_ms_per_step"] = round(roof_kv_ms, 3)
            row["fraction_of_roofline_with_kv_pipelined"] = round(roof_kv_ms / row["decode_ms_per_step_pipelined"], 3)
        experts_all, experts_read = expert_bytes(runner.model, bs)
        # What a step reads: what streams, less the experts no token chose, plus the embedding rows.
        read = (streamed_bytes - experts_all + experts_read
                + (0 if tied else bs * embed[0].numel() * embed.element_size()))
        if experts_all:
            row["moe_impl"] = "fused_triton" if runner.device.type == "cuda" and moe._fused_moe() else "torch_loop"
        if runner.device.type == "cuda":
            row.update(read_roofline(row, read, hbm))
        print(json.dumps(row), flush=True)
        if args.moe_torch_reference and experts_all:
            ref = {**row, **run_moe_torch_reference(runner, bs, args.input_len, args.output_len),
                   "moe_impl": "torch_loop", "cuda_graph": False}
            if runner.device.type == "cuda":
                ref = {k: v for k, v in ref.items() if "roofline" not in k}  # only the read roofline, redone
                ref.update(read_roofline(ref, read, hbm))
            print(json.dumps(ref), flush=True)
        if args.profile and runner.device.type == "cuda":
            print(json.dumps({"benchmark": "one_batch_profile", "device": device,
                              **profile_decode(runner, bs, args.input_len)}), flush=True)


if __name__ == "__main__":
    main()
