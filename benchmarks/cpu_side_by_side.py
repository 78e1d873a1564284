"""CPU side by side: the same workloads through this engine, vLLM-CPU and HF transformers
``generate``, alternating, with the ratios.

    python benchmarks/cpu_side_by_side.py --vllm-python /root/vllm-venv/bin/python
    python benchmarks/cpu_side_by_side.py --workloads 16x64 --rounds 5 --skip-hf

A workload ``NxM`` is N prompts of ``--input-len`` random token ids, each generating exactly M
tokens (greedy, ignore_eos), submitted at once. Each system runs in its own worker process,
started once and then fed workloads (vLLM-CPU alone takes 1-2 minutes to start): this engine
at its defaults (``Engine(model_path=...)``, plus ``--extra``), vLLM-CPU at its defaults
(``LLM(model=...)``: bf16 on CPU; ``VLLM_CPU_OMP_THREADS_BIND`` = every core and
``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` unless set) from the virtualenv of ``--vllm-python``
(default ``~/vllm-venv/bin/python``; skipped when it does not exist), and HF ``generate`` in
fp32 on one left-padded batch. In each round every workload runs on every system in turn,
the order rotating by round, with fresh prompts each round (the same for all systems), so the
systems share the machine's drift; compare the ratios of one run, not tok/s across runs.
While one system runs, the others' process trees are stopped (SIGSTOP, then SIGCONT): an idle
vLLM-CPU keeps its threads busy (measured: ~0.5 core while another engine ran), which would
otherwise slow whichever system it shares the cores with (``--no-pause`` keeps them running).

Prints one JSON line per measurement (``output_tok_per_s``: output tokens over the wall time
of the one generate call; ``cpu_s``: CPU time the system's processes used meanwhile), then per
workload the median tok/s of each system over the rounds and the ratios of this engine's to
the others' (median of the per-round ratios), also per CPU second (``*_per_cpu_s``: less
sensitive to other load on a shared machine than wall time, but spinning threads count).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

MARK = "@@side-by-side "  # prefix of a worker's reply lines on its stdout (libraries log there too)


# ---- workers: one process per system; stdin a JSON request per line, replies on stdout ----

def _serve(generate) -> None:
    """Answer each request ``{"prompts": [[ids]], "max_new_tokens": m}`` with the wall time of
    ``generate(prompts, m)`` and the output tokens it returned."""
    print(MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        start = time.perf_counter()
        produced = generate(req["prompts"], req["max_new_tokens"])
        elapsed = time.perf_counter() - start
        print(MARK + json.dumps({"elapsed_s": elapsed, "output_tokens": produced}), flush=True)


def worker_radixfleet(model: str, extra: dict) -> None:
    from radixfleet.engine.engine import Engine

    with Engine(model_path=model, **extra) as engine:
        info = engine.get_server_info()
        print(MARK + json.dumps({"dtype": info["dtype"]}), flush=True)

        def generate(prompts, m):
            params = {"max_new_tokens": m, "ignore_eos": True, "temperature": 0}
            outs = engine.generate(input_ids=prompts, sampling_params=params)
            return sum(o["meta_info"]["completion_tokens"] for o in outs)

        generate([[100 + i for i in range(16)]], 4)  # warm-up
        _serve(generate)


def worker_vllm(model: str, extra: dict) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **{"gpu_memory_utilization": 0.4, **extra})
    print(MARK + json.dumps({"dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch.")}),
          flush=True)

    def generate(prompts, m):
        params = SamplingParams(max_tokens=m, ignore_eos=True, temperature=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    generate([[100 + i for i in range(16)]], 4)
    _serve(generate)


def worker_hf(model: str, extra: dict) -> None:
    import torch
    from offline_throughput import left_padded  # benchmarks/, this script's folder
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, extra.get("dtype", "float32"))).eval()
    print(MARK + json.dumps({"dtype": str(hf.dtype).removeprefix("torch.")}), flush=True)

    def generate(prompts, m):
        ids, mask = left_padded(prompts)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=m, min_new_tokens=m,
                              do_sample=False, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * len(prompts)

    generate([[100 + i for i in range(16)]], 4)
    _serve(generate)


WORKERS = {"radixfleet": worker_radixfleet, "vllm": worker_vllm, "hf": worker_hf}


# ---- driver ----------------------------------------------------------------------------------

class Worker:
    """One system's worker process; ``run`` sends a workload and waits for its timing."""

    def __init__(self, system: str, python: str, model: str, extra: dict, env: dict | None = None):
        self.system = system
        cmd = [python, os.path.abspath(__file__), "--worker", system, "--model-path", model,
               "--extra", json.dumps(extra)]
        self.start = time.perf_counter()
        # Run from benchmarks/: vLLM's engine process starts with the working directory on
        # sys.path, where the checkout root's operator/ would shadow the standard library's.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, cwd=os.path.dirname(os.path.abspath(__file__)))
        self.info: dict = {}

    def wait_ready(self) -> None:
        """Wait for the worker's dtype and then its warm-up (workers start concurrently)."""
        self.info = self._reply()
        self.info.update(self._reply())  # {"ready": true}
        self.info["startup_s"] = round(time.perf_counter() - self.start, 1)

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            sys.stderr.write(line)  # the system's own logging
        raise RuntimeError(f"{self.system} worker exited with {self.proc.wait()} (its stderr is above)")

    def run(self, prompts: list[list[int]], max_new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_new_tokens": max_new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def _tree(self) -> list:
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid)]
            return procs + procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return []  # exited: close() reports it

    def _signal(self, sig: int) -> None:
        for proc in self._tree():
            with contextlib.suppress(psutil_gone()):
                proc.send_signal(sig)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the worker's processes so far (its engine's children too)."""
        total = 0.0
        for proc in self._tree():
            with contextlib.suppress(psutil_gone()):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    def pause(self) -> None:
        """Stop the worker's whole process tree (it takes no CPU until ``resume``)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def close(self) -> None:
        self.resume()
        # A worker that already died (its error is on stderr) has no stdin to close.
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def psutil_gone() -> type[Exception]:
    import psutil

    return psutil.NoSuchProcess


def parse_workload(text: str) -> tuple[int, int]:
    n, _, m = text.lower().partition("x")
    if not (n.isdigit() and m.isdigit() and int(n) > 0 and int(m) > 0):
        raise argparse.ArgumentTypeError(f"a workload is NxM (prompts x output tokens), got {text!r}")
    return int(n), int(m)


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def start_workers(args, model: str) -> dict[str, Worker]:
    workers = {"radixfleet": Worker("radixfleet", sys.executable, model, json.loads(args.extra))}
    vllm_python = os.path.expanduser(args.vllm_python)
    if args.skip_vllm or not os.path.exists(vllm_python):
        why = "--skip-vllm" if args.skip_vllm else f"no vLLM-CPU virtualenv python at {vllm_python}"
        print(json.dumps({"benchmark": "cpu_side_by_side", "system": "vllm", "skipped": why}), flush=True)
    else:
        cores = os.cpu_count() or 1
        env = {k: os.environ.get(k, v) for k, v in (("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}"),
                                                     ("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"))}
        workers["vllm"] = Worker("vllm", vllm_python, model, json.loads(args.vllm_extra), env)
    if not args.skip_hf:
        workers["hf"] = Worker("hf", sys.executable, model, {})
    return workers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--model-path", default="smollm2")
    p.add_argument("--workloads", type=parse_workload, nargs="+",
                   default=[(16, 64), (1, 256), (64, 128)], metavar="NxM")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vllm-python", default="~/vllm-venv/bin/python",
                   help="python of a virtualenv with vllm-cpu (skipped when missing)")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--extra", default="{}", help="JSON dict of extra Engine arguments for this engine")
    p.add_argument("--vllm-extra", default="{}", help="JSON dict of extra vllm.LLM arguments")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-pause", action="store_true",
                   help="leave the other systems running (idle) while one is measured")
    args = p.parse_args()
    if args.worker:
        WORKERS[args.worker](args.model_path, json.loads(args.extra))
        return

    from radixfleet.engine.models.model_config import ModelConfig
    from radixfleet.engine.models.model_prep import resolve_model_path

    model = str(resolve_model_path(args.model_path))
    vocab = ModelConfig.from_path(model).vocab_size
    common = {"benchmark": "cpu_side_by_side", "model": args.model_path, "input_len": args.input_len,
              "cpus": os.cpu_count()}
    # SIGTERM runs the finally below too: stopped workers must be resumed to exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workers = start_workers(args, model)
    try:
        for name, w in workers.items():
            w.wait_ready()
            print(json.dumps({**common, "system": name, **w.info}), flush=True)
        rates: dict[tuple[int, int], dict[str, list[float]]] = {w: {s: [] for s in workers} for w in args.workloads}
        per_cpu: dict[tuple[int, int], dict[str, list[float]]] = {w: {s: [] for s in workers} for w in args.workloads}
        order = list(workers)
        for rnd in range(args.rounds):
            turn = order[rnd % len(order):] + order[:rnd % len(order)]
            for k, (n, m) in enumerate(args.workloads):
                prompts = prompts_for(n, args.input_len, vocab, args.seed * 1000 + rnd * 10 + k)
                for name in turn:
                    others = [] if args.no_pause else [w for n, w in workers.items() if n != name]
                    for w in others:
                        w.pause()
                    cpu0 = workers[name].cpu_seconds()
                    try:
                        got = workers[name].run(prompts, m)
                    finally:
                        for w in others:
                            w.resume()
                    cpu = workers[name].cpu_seconds() - cpu0
                    rate = got["output_tokens"] / got["elapsed_s"]
                    rates[(n, m)][name].append(rate)
                    per_cpu[(n, m)][name].append(got["output_tokens"] / max(cpu, 1e-3))
                    print(json.dumps({**common, "system": name, "workload": f"{n}x{m}", "round": rnd,
                                      "output_tokens": got["output_tokens"],
                                      "elapsed_s": round(got["elapsed_s"], 3),
                                      "output_tok_per_s": round(rate, 1), "cpu_s": round(cpu, 2),
                                      "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
    finally:
        for w in workers.values():
            w.close()
    for (n, m), per in rates.items():
        ours = per["radixfleet"]
        row = {**common, "system": "summary", "workload": f"{n}x{m}", "rounds": args.rounds,
               **{f"{s}_tok_per_s": round(statistics.median(v), 1) for s, v in per.items()}}
        row.update({f"{s}_tok_per_cpu_s": round(statistics.median(v), 1) for s, v in per_cpu[(n, m)].items()})
        for other in per:
            if other != "radixfleet":
                row[f"radixfleet_over_{other}"] = round(statistics.median(
                    a / b for a, b in zip(ours, per[other], strict=True)), 3)
                row[f"radixfleet_over_{other}_per_cpu_s"] = round(statistics.median(
                    a / b for a, b in zip(per_cpu[(n, m)]["radixfleet"], per_cpu[(n, m)][other], strict=True)), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
