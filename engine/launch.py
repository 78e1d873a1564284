"""Starting the engine's child processes (scheduler, detokenizer) and ending them.

Children are fresh interpreters (``python -m radixfleet.engine.launch``) that read their
role and arguments as a pickle on stdin, so the caller's ``__main__`` is never re-imported
(plain scripts without a main guard and notebooks both work). Each child watches its parent
and exits within a second of the parent's death, SIGKILL included.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Any

_PARENT_POLL_S = 0.5


def spawn(role: str, kwargs: dict[str, Any], log_level: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP's default busy-wait makes every torch op on CPU ~20x slower as soon as another
    # process competes for the cores (several workers on a laptop, tests beside an engine).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.Popen([sys.executable, "-m", "radixfleet.engine.launch"], stdin=subprocess.PIPE,
                            env=env, start_new_session=False)
    assert proc.stdin is not None
    proc.stdin.write(pickle.dumps({"role": role, "kwargs": kwargs, "parent": os.getpid(),
                                   "log_level": log_level}))
    proc.stdin.close()
    return proc


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


def _watch_parent(parent: int) -> None:
    def loop() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(0)
            time.sleep(_PARENT_POLL_S)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def _run_scheduler(config, model_path, ipc_names) -> None:
    import zmq

    from radixfleet.engine import ipc
    from radixfleet.engine.scheduler import Scheduler

    ready = ipc.connect_push(zmq.Context.instance(), ipc_names["tokenizer"])
    try:
        scheduler = Scheduler(config, model_path, ipc_names)
    except Exception as e:  # reported to the parent, which raises it to the user
        logging.getLogger(__name__).exception("scheduler failed to start")
        ipc.send(ready, {"ready": "scheduler", "error": f"{type(e).__name__}: {e}"})
        time.sleep(0.5)
        raise SystemExit(1) from e
    ipc.send(ready, {"ready": "scheduler", "info": scheduler.ready_info()})
    scheduler.event_loop()


def _run_detokenizer(tokenizer_path, trust_remote_code, ipc_names, skip_tokenizer_init) -> None:
    import zmq

    from radixfleet.engine import ipc
    from radixfleet.engine.detokenizer import run_detokenizer

    ready = ipc.connect_push(zmq.Context.instance(), ipc_names["tokenizer"])
    ipc.send(ready, {"ready": "detokenizer"})
    run_detokenizer(tokenizer_path, trust_remote_code, ipc_names, skip_tokenizer_init)


ROLES = {"scheduler": _run_scheduler, "detokenizer": _run_detokenizer}


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
