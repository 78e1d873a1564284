"""Starting the engine's child processes (scheduler, detokenizer) and ending them.

Children are fresh interpreters (``python -m radixfleet.engine.managers.launch``) that read their
role and arguments as a pickle on stdin, so the caller's ``__main__`` is never re-imported
(plain scripts without a main guard and notebooks both work). Each child watches its parent
and exits within a second of the parent's death, SIGKILL included.

With tensor parallelism a node runs ``tp_size // nnodes`` scheduler-side ranks: global rank 0
is the ``scheduler`` role, every other rank a ``tp_follower`` (see ``tp_worker``).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from radixfleet.engine.executor.cpu_threads import omp_wait_env

_PARENT_POLL_S = 0.5


def spawn(role: str, kwargs: dict[str, Any], log_level: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    omp_wait_env(env)
    # NVLink SHARP (multicast) collectives hang or fail on the GPU hosts we run on.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    proc = subprocess.Popen([sys.executable, "-m", "radixfleet.engine.managers.launch"], stdin=subprocess.PIPE,
                            env=env, start_new_session=False)
    assert proc.stdin is not None
    proc.stdin.write(pickle.dumps({"role": role, "kwargs": kwargs, "parent": os.getpid(),
                                   "log_level": log_level}))
    proc.stdin.close()
    proc.role = role  # type: ignore[attr-defined]
    return proc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def terminate(procs: list[subprocess.Popen], timeout: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_exit(procs: list[subprocess.Popen], timeout: float) -> None:
    """Give ``procs`` up to ``timeout`` seconds to exit on their own."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            return


def _watch_parent(parent: int) -> None:
    def loop() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(0)
            time.sleep(_PARENT_POLL_S)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def wait_ready(sock, need: set[str], procs: list[subprocess.Popen], timeout: float) -> dict[str, dict]:
    """Read ``{"ready": role, ...}`` messages from ``sock`` until every role in ``need`` has
    reported; raise with a child's start-up error, or when a child exits or time runs out."""
    from radixfleet.engine.managers import ipc

    need, got = set(need), {}
    deadline = time.monotonic() + timeout
    while need:
        if sock.poll(200):
            msg = ipc.recv(sock)
            if isinstance(msg, dict) and "ready" in msg:
                if msg.get("error"):
                    raise RuntimeError(f"engine {msg['ready']} failed to start: {msg['error']}")
                need.discard(msg["ready"])
                got[msg["ready"]] = msg
            continue
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"an engine process exited during start-up (exit code {dead[0].returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the engine did not start within {timeout:.0f} s (waiting for {sorted(need)})")
    return got


def rank_role(rank: int) -> str:
    """The name a TP rank reports itself ready under."""
    return "scheduler" if rank == 0 else f"tp-rank-{rank}"


def _init_rank(config, rank: int, local_rank: int, init_method: str | None) -> None:
    """Join the replica's TP group (a no-op for tp_size 1); before any model is built."""
    from radixfleet.engine.executor.model_runner import resolve_device
    from radixfleet.engine.layers import distributed as dist

    cuda = resolve_device(config.device).type == "cuda"
    if config.tp_size > 1:
        import torch

        if cuda:
            torch.cuda.set_device(local_rank)
        elif "OMP_NUM_THREADS" not in os.environ:
            # The node's ranks share its cores.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // (config.tp_size // config.nnodes)))
    dist.init_tensor_parallel(rank, config.tp_size, init_method, "nccl" if cuda else "gloo")


def _start(role: str, ipc_names, build):
    """Run ``build()``; report its result's readiness (or its error) to the engine."""
    import zmq

    from radixfleet.engine.managers import ipc

    ready = ipc.connect_push(zmq.Context.instance(), ipc_names["tokenizer"])
    try:
        obj, info = build()
    except Exception as e:  # reported to the parent, which raises it to the user
        logging.getLogger(__name__).exception("%s failed to start", role)
        ipc.send_last(ready, {"ready": role, "error": f"{type(e).__name__}: {e}"})
        raise SystemExit(1) from e
    ipc.send_last(ready, {"ready": role, "info": info})
    return obj


def _exit_stopped() -> None:
    """Leave a rank stopped by rank 0. Skips ``destroy_process_group``: with NCCL it waited
    for peers that had already gone (rank 0 hung > 5 s on an H200 pair) and freed nothing the
    process exit does not."""
    logging.shutdown()
    os._exit(0)


def _run_scheduler(config, model_path, ipc_names, rank: int = 0, local_rank: int = 0,
                   init_method: str | None = None) -> None:
    from radixfleet.engine.models.model_config import ModelConfig
    from radixfleet.engine.models.registry import embedding_model_class

    def build():
        from radixfleet.engine.managers.scheduler_io import ZmqSchedulerIO

        if embedding_model_class(ModelConfig.from_path(model_path).architecture, config.is_embedding):
            from radixfleet.engine.managers.embedding_scheduler import EmbeddingScheduler

            scheduler = EmbeddingScheduler(config, model_path, ZmqSchedulerIO(ipc_names, detokenizer=False))
        else:
            from radixfleet.engine.executor.model_runner import ModelRunner
            from radixfleet.engine.managers.scheduler import Scheduler

            _init_rank(config, rank, local_rank, init_method)
            scheduler = Scheduler(config, ModelRunner(config, model_path), ZmqSchedulerIO(ipc_names), model_path)
        return scheduler, scheduler.ready_info()

    _start(rank_role(rank), ipc_names, build).event_loop()
    _exit_stopped()


def _run_tp_follower(config, model_path, ipc_names, rank: int, local_rank: int, init_method: str | None) -> None:
    from radixfleet.engine.executor.model_runner import ModelRunner
    from radixfleet.engine.executor.tp_worker import follow

    def build():
        _init_rank(config, rank, local_rank, init_method)
        runner = ModelRunner(config, model_path, local_rank)
        return runner, {"device": str(runner.device), "max_total_tokens": runner.max_total_tokens}

    follow(_start(rank_role(rank), ipc_names, build))
    _exit_stopped()


def _run_detokenizer(tokenizer_path, trust_remote_code, ipc_names, skip_tokenizer_init) -> None:
    import zmq

    from radixfleet.engine.managers import ipc
    from radixfleet.engine.managers.detokenizer import run_detokenizer

    ipc.send_last(ipc.connect_push(zmq.Context.instance(), ipc_names["tokenizer"]), {"ready": "detokenizer"})
    run_detokenizer(tokenizer_path, trust_remote_code, ipc_names, skip_tokenizer_init)


ROLES = {"scheduler": _run_scheduler, "tp_follower": _run_tp_follower, "detokenizer": _run_detokenizer}


def _child_main() -> None:
    spec = pickle.loads(sys.stdin.buffer.read())
    _watch_parent(spec["parent"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which ends us
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    logging.basicConfig(level=getattr(logging, spec["log_level"].upper()),
                        format=f"%(asctime)s {spec['role']} %(levelname)s %(name)s: %(message)s")
    ROLES[spec["role"]](**spec["kwargs"])


if __name__ == "__main__":
    _child_main()
