"""An engine on CPU gives cores to other busy processes and takes them back
(engine/executor/cpu_threads.py), with the same greedy output at every thread count."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from radixfleet.engine.engine import Engine

PROMPT_IDS = [[100 + 7 * i + j for j in range(24)] for i in range(8)]
PARAMS = {"max_new_tokens": 24, "ignore_eos": True, "temperature": 0}


def _threads(engine: Engine) -> int:
    return engine.get_server_info()["internal_states"][0]["cpu_threads"]


def _generate_until(engine: Engine, done, timeout_s: float = 90.0) -> list[list[int]]:
    """Generate (the guard acts before steps) until ``done(threads)``; the last outputs."""
    deadline = time.monotonic() + timeout_s
    while True:
        outs = engine.generate(input_ids=PROMPT_IDS, sampling_params=PARAMS)
        if done(_threads(engine)) or time.monotonic() > deadline:
            return [o["output_ids"] for o in outs]


def test_threads_follow_the_free_cores(model_dir, monkeypatch):
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: there is no thread count to lower")
    monkeypatch.delenv("RADIXFLEET_CPU_SPIN", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with Engine(model_path=model_dir, max_total_tokens=4096) as engine:
        quiet = _generate_until(engine, lambda n: n == cores)
        assert _threads(engine) == cores
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
        try:
            loaded = _generate_until(engine, lambda n: n < cores)
            assert _threads(engine) < cores, "the engine kept every thread beside busy loops on all its cores"
        finally:
            for p in busy:
                p.kill()
                p.wait()
        again = _generate_until(engine, lambda n: n == cores)
        assert _threads(engine) == cores, "the engine did not take its cores back"
    assert loaded == quiet == again
