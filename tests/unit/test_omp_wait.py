"""How engine processes' OpenMP threads wait between ops, and how many run
(engine/executor/cpu_threads.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from radixfleet.engine.executor.cpu_threads import (
    AUTO_SPIN_COUNT,
    CoreGuard,
    core_guard,
    omp_wait_env,
    threads_for,
    threads_spin,
)


def test_default_spins(monkeypatch):
    """Fast with the cores to itself; the CoreGuard handles sharing them."""
    monkeypatch.delenv("RADIXFLEET_CPU_SPIN", raising=False)
    env: dict[str, str] = {}
    omp_wait_env(env)
    assert env == {"GOMP_SPINCOUNT": str(AUTO_SPIN_COUNT)}
    assert threads_spin(env)


def test_zero_never_spins(monkeypatch):
    monkeypatch.setenv("RADIXFLEET_CPU_SPIN", "0")
    env: dict[str, str] = {}
    omp_wait_env(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert not threads_spin(env)


def test_a_spin_count(monkeypatch):
    monkeypatch.setenv("RADIXFLEET_CPU_SPIN", "5000")
    env: dict[str, str] = {}
    omp_wait_env(env)
    assert env == {"GOMP_SPINCOUNT": "5000"}


@pytest.mark.parametrize("bad", ["fast", "-1", "1e6"])
def test_a_bad_setting_is_a_clear_error(monkeypatch, bad):
    monkeypatch.setenv("RADIXFLEET_CPU_SPIN", bad)
    with pytest.raises(ValueError, match="RADIXFLEET_CPU_SPIN"):
        omp_wait_env({})


def test_the_callers_own_setting_wins(monkeypatch):
    monkeypatch.setenv("RADIXFLEET_CPU_SPIN", "0")
    for own in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "7"}):
        env = dict(own)
        omp_wait_env(env)
        assert env == own
        assert threads_spin(env)


def test_whether_libgomp_spins():
    assert threads_spin({})  # libgomp's own default spins 300,000 rounds
    assert not threads_spin({"OMP_WAIT_POLICY": "passive"})
    assert not threads_spin({"GOMP_SPINCOUNT": "0", "OMP_WAIT_POLICY": "ACTIVE"})  # the count wins
    assert threads_spin({"GOMP_SPINCOUNT": "infinite"})
    assert threads_spin({"GOMP_SPINCOUNT": "10k", "OMP_WAIT_POLICY": "PASSIVE"})


@pytest.mark.parametrize("max_threads, cpus, others, current, want", [
    (2, 2, 0.0, 2, 2),   # quiet: every thread
    (2, 2, 0.3, 2, 2),   # light background work leaves the cores
    (2, 2, 0.67, 2, 1),  # one busy loop, squeezed by our two spinning threads
    (2, 2, 1.0, 1, 1),   # one busy loop
    (2, 2, 3.0, 2, 1),   # never fewer than one
    (2, 2, 0.4, 1, 1),   # a core is taken back only once it is 80 % free...
    (2, 2, 0.15, 1, 2),  # ...
    (4, 8, 1.0, 4, 4),   # fewer threads than free cores: unchanged
    (8, 8, 2.2, 8, 6),
    (8, 8, 2.5, 5, 5),
    (8, 8, 2.5, 8, 6),
    (16, 4, 0.0, 16, 4),  # more threads than cores never helps a spinning pool
])
def test_threads_for(max_threads, cpus, others, current, want):
    assert threads_for(max_threads, cpus, others, current) == want


def _stat(busy_per_cpu: list[int], extra_cpu_busy: int = 0) -> str:
    """``/proc/stat`` text: ``busy`` user ticks and 1,000 idle ticks per core, plus a core 99
    outside the affinity mask."""
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]
    lines += [f"cpu{i} {b} 0 0 1000 0 0 0 0 0 0" for i, b in enumerate(busy_per_cpu)]
    lines += [f"cpu99 {extra_cpu_busy} 0 0 1000 0 0 0 0 0 0", "intr 1 2 3", "ctxt 9"]
    return "\n".join(lines)


def test_core_guard_follows_other_processes(monkeypatch):
    """Two cores, two threads; each half-second reading feeds in the cores' busy ticks and the
    engine's own CPU time, and the next tick sets the thread count to what fits."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "sysconf", lambda name: 100)  # 100 ticks a second
    clock, stat, own, set_to = [0.0], [_stat([0, 0])], [0.0], []
    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    guard = CoreGuard(read_stat=lambda: stat[0], own_cpu_s=lambda: own[0],
                      set_threads=set_to.append, clock=lambda: clock[0])
    busy = [0, 0]

    def window(add: list[int], own_s: float, outside: int = 0) -> None:
        clock[0] += 0.5
        busy[:] = [b + a for b, a in zip(busy, add, strict=True)]
        stat[0] = _stat(busy, outside)
        own[0] += own_s
        guard.sample()

    guard.sample()  # the first reading
    guard.tick()
    # The engine alone keeps both cores busy (100 ticks in 0.5 s): nothing changes.
    window([50, 50], 1.0)
    guard.tick()
    assert set_to == []
    # A busy loop appears: the cores stay full, but a third of it is not ours.
    window([50, 50], 0.67)
    assert set_to == []  # applied by the loop thread's next tick, not by the sampler
    guard.tick()
    assert set_to == [1] and guard.threads == 1
    guard.tick()
    assert set_to == [1]
    # Busy work on a core outside the affinity mask does not count.
    window([50, 50], 0.5, outside=10_000)
    guard.tick()
    assert set_to == [1]  # the busy loop still holds a core
    # The busy loop ends: the engine, on one thread, is alone again.
    window([50, 0], 0.5)
    guard.tick()
    assert set_to == [1, 2] and guard.threads == 2
    # An idle engine next to a busy loop: the loop's core counts (the sampler reads on).
    window([50, 0], 0.0)
    guard.tick()
    assert set_to == [1, 2, 1]
    # Never above the thread count it started with.
    window([0, 0], 0.0)
    window([50, 50], 1.0)
    guard.tick()
    assert set_to == [1, 2, 1, 2]


def test_core_guard_samples_while_the_engine_idles(monkeypatch):
    """The sampler thread reads on its own: a busy loop that starts beside an idle engine is
    seen before the engine's next step, and applied by that step's tick."""
    import os
    import time

    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "sysconf", lambda name: 100)
    reads = [0]

    def read_stat() -> str:  # each reading: half a second later, core 1 50 ticks busier
        reads[0] += 1
        return _stat([0, 50 * reads[0]])

    set_to: list[int] = []
    guard = CoreGuard(interval_s=0.01, read_stat=read_stat, own_cpu_s=lambda: 0.0,
                      set_threads=set_to.append, clock=lambda: 0.5 * reads[0]).start()
    deadline = time.monotonic() + 10
    while guard.target != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    guard.stop()
    assert guard.target == 1 and set_to == []
    guard.tick()
    assert set_to == [1]


def test_core_guard_only_on_cpu_with_spinning_threads(monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    assert core_guard("cuda") is None
    guard = core_guard("cpu")
    assert isinstance(guard, CoreGuard)
    guard.stop()
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert core_guard("cpu") is None


def test_the_thread_count_changes_in_a_running_process():
    """``torch.set_num_threads`` after the pool has started takes effect for oneDNN's
    prepacked linears (the engine's CPU matmuls): at 1 thread the process uses at most one
    core even though libgomp spins; bit-identical results at 1 and 2 threads. In bf16 where
    oneDNN packs it (the engine's CPU default there), else in fp32 (AVX2-only CPUs)."""
    code = """
import time, torch
torch.manual_seed(0)
dtype = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
w = torch.randn(1536, 576, dtype=dtype)
packed = torch.ops.mkldnn._reorder_linear_weight(w)
x = torch.randn(16, 576, dtype=dtype)
lin = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
torch.set_num_threads(2)
y2 = [lin() for _ in range(300)][-1]
torch.set_num_threads(1)
t, c = time.perf_counter(), time.process_time()
y1 = [lin() for _ in range(2000)][-1]
print(torch.equal(y1, y2), (time.process_time() - c) / (time.perf_counter() - t))
"""
    import torch

    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("no oneDNN linear in this torch build")
    env = {**__import__("os").environ, "GOMP_SPINCOUNT": "1000000"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    same, cores = out.stdout.split()
    assert same == "True"
    assert float(cores) < 1.3  # two spinning threads would read ~2
