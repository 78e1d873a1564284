"""How an engine's OpenMP threads wait between ops on CPU, and how many of them run.

Between the ops of a decode step the OpenMP worker threads either sleep (``PASSIVE``: each op
then pays a futex wake-up) or spin for ``GOMP_SPINCOUNT`` rounds. Spinning was 1.18x faster
with the cores to itself (16 requests x 64 tokens, 2 cores: 672 against 569 tok/s), but as
soon as another busy process shares the cores it collapses (212 against 429 tok/s with one
busy loop beside it; 97 with a spin count of 30,000): a spinning thread holds the core that the
thread it waits for needs. Fewer threads than cores avoids that: the same spinning engine on
one thread, beside the busy loop, made 482 tok/s.

So by default (``RADIXFLEET_CPU_SPIN=auto``) the engine's children spin, and a running engine
keeps its thread count within the cores that other processes leave free (``CoreGuard``,
measured from ``/proc/stat`` five times a second). libgomp reads its wait policy once, when it is
loaded, so the policy is set in the children's environment (``omp_wait_env``); the thread count
is what changes at run time. Thread counts do not change results: oneDNN and MKL linears gave
bit-identical outputs at 1 and 2 threads, and the C kernels split work by row.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping

from radixfleet import env_vars

logger = logging.getLogger(__name__)

AUTO_SPIN_COUNT = 1_000_000  # ~10 ms of pause rounds: covers a decode step's gaps, not idle time
GUARD_INTERVAL_S = 0.2  # /proc/stat counts 100 ticks a second: 20 a core per reading


def spin_setting() -> int | None:
    """``RADIXFLEET_CPU_SPIN``: ``None`` for ``auto``, else the spin count (0: never spin)."""
    raw = env_vars.CPU_SPIN.get().strip().lower()
    if raw == "auto":
        return None
    if not raw.isdigit():
        raise ValueError(f"RADIXFLEET_CPU_SPIN={raw!r}: expected `auto` or a spin count >= 0 "
                         f"(0: never spin)")
    return int(raw)


def omp_wait_env(env: dict[str, str]) -> None:
    """Set how a child's OpenMP threads wait between ops (in ``env``, the child's environment).

    A caller that tunes the wait itself (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``) is left
    alone; ``RADIXFLEET_CPU_SPIN=0`` sleeps at once, ``auto`` (the default) and a count spin."""
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return
    spin = spin_setting()
    if spin == 0:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        env["GOMP_SPINCOUNT"] = str(AUTO_SPIN_COUNT if spin is None else spin)


def threads_spin(env: Mapping[str, str]) -> bool:
    """Whether libgomp, loaded with ``env``, spins between ops (its default does: 300,000)."""
    count = env.get("GOMP_SPINCOUNT", "").strip().lower()
    if count:
        return count == "infinite" or not count.isdigit() or int(count) > 0
    return env.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"


def threads_for(max_threads: int, cpus: int, others_busy: float, current: int) -> int:
    """How many threads fit on ``cpus`` cores when other processes keep ``others_busy`` cores
    busy, for a pool of ``current``: a core more than half busy is taken; a core is taken back
    once it is 80 % free (the margin keeps a reading's noise from flapping the count). At least
    one thread, at most ``max_threads``."""
    free = cpus - max(others_busy, 0.0)
    down, up = math.floor(free + 0.5), math.floor(free + 0.2)
    target = down if down < current else max(current, up)
    return max(1, min(max_threads, target))


def _busy_ticks(cpus: set[int], stat: str) -> int:
    """Busy clock ticks (all but idle and iowait) of ``cpus``, from ``/proc/stat`` text."""
    total = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks) - ticks[3] - ticks[4]
    return total


def _read_proc_stat() -> str:
    with open("/proc/stat") as f:
        return f.read()


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class CoreGuard:
    """Keeps a running engine's thread count within the cores other processes leave free.

    A sampler thread (``start``) measures every ``interval_s`` (0.2 s) the busy time of this
    process's cores minus this process's own CPU time, and works out how many threads fit
    (``threads_for``, up to the count it started with); ``tick()``, called on the engine's
    loop thread before each step, applies it with ``torch.set_num_threads`` (OpenMP's thread
    count belongs to the thread that sets it). Sampling also while the engine is idle keeps
    each reading to the last interval: a window spanning an idle spell would charge the engine
    for whatever ran meanwhile."""

    def __init__(self, interval_s: float = GUARD_INTERVAL_S,
                 read_stat: Callable[[], str] = _read_proc_stat,
                 own_cpu_s: Callable[[], float] = _own_cpu_s,
                 set_threads: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        import torch

        self.cpus = set(os.sched_getaffinity(0))
        self.max_threads = self.threads = self.target = torch.get_num_threads()
        self.others_busy = 0.0
        self.interval_s = interval_s
        self._read_stat, self._own_cpu_s, self._clock = read_stat, own_cpu_s, clock
        self._set_threads = set_threads or torch.set_num_threads
        self._tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
        self._last: tuple[float, int, float] | None = None
        self._stopped = threading.Event()

    def sample(self) -> None:
        """One reading; from the second on, ``target`` is what fits over the last interval."""
        now, busy, own = self._clock(), _busy_ticks(self.cpus, self._read_stat()), self._own_cpu_s()
        if self._last is not None and now > self._last[0]:
            then, busy0, own0 = self._last
            self.others_busy = ((busy - busy0) * self._tick_s - (own - own0)) / (now - then)
            self.target = threads_for(self.max_threads, len(self.cpus), self.others_busy, self.threads)
        self._last = (now, busy, own)

    def tick(self) -> None:
        target = self.target
        if target != self.threads:
            logger.info("CPU threads %d -> %d (other processes keep %.1f of %d cores busy)",
                        self.threads, target, self.others_busy, len(self.cpus))
            self._set_threads(target)
            self.threads = target

    def start(self) -> CoreGuard:
        def loop() -> None:
            while not self._stopped.is_set():
                self.sample()
                self._stopped.wait(self.interval_s)

        threading.Thread(target=loop, name="core-guard", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()


def core_guard(device_type: str) -> CoreGuard | None:
    """A ``CoreGuard`` for an engine on CPU whose OpenMP threads spin, else ``None``."""
    if device_type != "cpu" or not threads_spin(os.environ) or not os.path.exists("/proc/stat"):
        return None
    return CoreGuard().start()
