"""``radixfleet up``: a router and N engine servers on this machine, as child processes.

The router starts with zero workers; each engine is registered through
``POST /add_worker?url=`` as soon as its ``/health`` answers 200, and the OpenAI base URL is
printed once all of them are in. An engine that exits, before it is ready or while serving
(removed from the router then), is started again on its port, up to ``--max-restarts``
times, and registered again once healthy. Ctrl-C or SIGTERM stops everything: SIGTERM to each
child's process group, SIGKILL after ``shutdown_timeout``, and a final sweep of any
descendant still alive, so no process outlives the fleet.

Start time on the default model (already prepared with ``radixfleet model prepare``), two
CPU engines on a 2-core machine: ~20-35 s until the URL is printed; the first request then
takes a few seconds more (CPU prefill).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil

from radixfleet.engine.models.model_prep import ALIASES, prepare_default_model

from .cli_fields import add_dataclass_flags, from_namespace
from .config import POLICY_NAMES

log = logging.getLogger("radixfleet.up")

DEFAULT_WORKER_COMMAND = ("{python} -m radixfleet.engine.server.serve --model-path {model_path} --host {host} --port {port}"
                          " --kv-events-port {kv_events_port}")


@dataclass(frozen=True)
class FleetConfig:
    """Everything ``radixfleet up`` can be told; each field is a ``--flag``."""

    model_path: str = field(default="smollm2", metadata={"help": "Model every engine serves."})
    workers: int = field(default=2, metadata={"help": "Number of engine servers."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address of the router and the engines."})
    port: int = field(default=30000, metadata={"help": "Router port; engines take the next free ports."})
    policy: str = field(default="auto", metadata={"help": "Routing policy (auto: precise on the engines' KV events).",
                                                  "choices": POLICY_NAMES})
    api_key: str = field(default="", metadata={"help": "API key the router requires (optional)."})
    worker_command: str = field(default=DEFAULT_WORKER_COMMAND, metadata={
        "help": "Command template of one engine; {python} {model_path} {host} {port} {kv_events_port} are filled in."})
    startup_timeout: float = field(default=600.0, metadata={"help": "Seconds each engine may take to become healthy."})
    shutdown_timeout: float = field(default=10.0, metadata={"help": "Seconds between SIGTERM and SIGKILL on shutdown."})
    max_restarts: int = field(default=3, metadata={
        "help": "Times an engine that exits (before or after it was ready) is started again on its port."})

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if "{port}" not in self.worker_command:
            raise ValueError("worker_command must contain {port}")


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def pick_ports(host: str, first: int, n: int) -> list[int]:
    """``first``, ``first+1``, ... skipping taken ports (then any free port)."""
    ports: list[int] = []
    candidate = first
    while len(ports) < n and candidate < 65536:
        if _port_is_free(host, candidate):
            ports.append(candidate)
        candidate += 1
    while len(ports) < n:
        ports.append(_any_free_port(host))
    return ports


def _any_free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the fleet process dies (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str]) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so it and its children can be signalled together)."""
    log.debug("starting %s", shlex.join(cmd))
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)


def stop_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM every process group, SIGKILL what is left after ``timeout``, then sweep descendants."""
    descendants: list[psutil.Process] = []
    for p in procs:
        try:
            descendants += psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %g s; killing it", p.pid, timeout)
            _signal_group(p, signal.SIGKILL)
            p.wait(5)
    _, alive = psutil.wait_procs(descendants, timeout=max(0.0, deadline - time.monotonic()))
    for d in alive:
        log.warning("killing leftover process %d", d.pid)
        d.kill()
    psutil.wait_procs(alive, timeout=5)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


class Fleet:
    """Starts, registers and stops the router and the engines."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.stop = threading.Event()
        self.router_url = f"http://{config.host}:{config.port}"
        self.headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.http = httpx.Client(timeout=2.0, trust_env=False)
        self.procs: list[subprocess.Popen] = []

    def router_command(self) -> list[str]:
        c = self.config
        cmd = [sys.executable, "-m", "radixfleet", "router", "--host", c.host, "--port", str(c.port), "--policy", c.policy]
        return cmd + (["--api-key", c.api_key] if c.api_key else [])

    def worker_command(self, port: int) -> list[str]:
        c = self.config
        events = _any_free_port(c.host) if "{kv_events_port}" in c.worker_command else 0
        return shlex.split(c.worker_command.format(python=sys.executable, model_path=c.model_path, host=c.host, port=port,
                                                   kv_events_port=events))

    def _healthy(self, url: str) -> bool:
        try:
            return self.http.get(url + "/health", headers=self.headers).status_code == 200
        except httpx.TransportError:
            return False

    def run(self) -> int:
        """Run until stopped; returns the exit code."""
        try:
            return self._run()
        finally:
            stop_all(self.procs, self.config.shutdown_timeout)
            self.http.close()
            log.info("fleet stopped")

    def _run(self) -> int:
        c = self.config
        if not _port_is_free(c.host, c.port):
            log.error("port %d on %s is taken; pick another with --port", c.port, c.host)
            return 1
        if c.model_path in ALIASES:
            # Convert the default model once here, not in N workers at the same time.
            prepare_default_model()
        router = spawn(self.router_command())
        self.procs.append(router)
        if not self._wait(lambda: self._healthy(self.router_url), router, 60.0):
            log.error("the router did not start")
            return 1
        log.info("router up at %s with no workers; starting %d engines", self.router_url, c.workers)
        ports: dict[str, int] = {f"http://{c.host}:{port}": port for port in pick_ports(c.host, c.port + 1, c.workers)}
        workers = {url: self._start_engine(port) for url, port in ports.items()}
        restarts = dict.fromkeys(workers, 0)
        deadlines = dict.fromkeys(workers, time.monotonic() + c.startup_timeout)
        pending, registered = set(workers), []
        announced = False

        def exited(url: str, when: str) -> None:
            """An engine has exited: start it again on its port while restarts are left."""
            log.error("engine %s exited with code %s %s", url, workers[url].returncode, when)
            if restarts[url] >= c.max_restarts:
                log.error("engine %s: no restarts left (--max-restarts %d); giving up on it", url, c.max_restarts)
                return
            restarts[url] += 1
            self.procs.remove(workers[url])  # exited: nothing of it to stop, and its pid may be reused
            log.warning("engine %s: starting it again (restart %d of %d)", url, restarts[url], c.max_restarts)
            workers[url] = self._start_engine(ports[url])
            deadlines[url] = time.monotonic() + c.startup_timeout
            pending.add(url)

        while not self.stop.is_set():
            for url in sorted(pending):
                if workers[url].poll() is not None:
                    pending.discard(url)
                    exited(url, "before it was ready")
                elif self._healthy(url) and self._register(url):
                    registered.append(url)
                    pending.discard(url)
                elif time.monotonic() > deadlines[url]:
                    log.error("engine %s not healthy after %g s; giving up on it", url, c.startup_timeout)
                    pending.discard(url)
            for url in [u for u in registered if workers[u].poll() is not None]:
                registered.remove(url)
                self._deregister(url)
                exited(url, "while serving; removed from the router")
            if router.poll() is not None:
                log.error("the router exited with code %s", router.returncode)
                return 1
            if not pending and not announced:
                if not registered:
                    log.error("no engine became ready")
                    return 1
                print(f"radixfleet: {len(registered)} worker(s) ready; OpenAI base URL: {self.router_url}/v1", flush=True)
                announced = True
            self.stop.wait(0.25)
        return 0

    def _start_engine(self, port: int) -> subprocess.Popen:
        proc = spawn(self.worker_command(port))
        self.procs.append(proc)
        return proc

    def _deregister(self, url: str) -> None:
        try:
            self.http.post(self.router_url + "/remove_worker", params={"url": url}, headers=self.headers, timeout=10.0)
        except httpx.TransportError as e:
            log.warning("remove_worker %s failed: %s", url, e)

    def _register(self, url: str) -> bool:
        try:
            resp = self.http.post(self.router_url + "/add_worker", params={"url": url}, headers=self.headers, timeout=60.0)
        except httpx.TransportError as e:
            log.warning("add_worker %s failed: %s", url, e)
            return False
        (log.info if resp.status_code == 200 else log.warning)("add_worker %s: %s", url, resp.text)
        return resp.status_code == 200

    def _wait(self, ready, proc: subprocess.Popen, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            if proc.poll() is not None:
                return False
            if ready():
                return True
            time.sleep(0.1)
        return False


def main(argv: list[str]) -> int:
    """Entry point of ``radixfleet up``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="radixfleet up", description=__doc__.splitlines()[0])
    add_dataclass_flags(parser, FleetConfig)
    try:
        config = from_namespace(FleetConfig, parser.parse_args(argv))
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per health poll
    fleet = Fleet(config)

    def on_signal(signum: int, frame) -> None:
        log.info("got %s; stopping the fleet", signal.Signals(signum).name)
        fleet.stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return fleet.run()
