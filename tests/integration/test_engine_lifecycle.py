"""No engine process outlives the engine: shutdown(), a `with` block, or a SIGKILLed parent.
Bad input raises ValueError naming the problem, and the engine keeps serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from radixfleet.engine.engine import Engine


def engine_children(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "radixfleet.engine.managers.launch" in " ".join(p.cmdline())]


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def test_shutdown_and_with_block_end_every_child(model_dir):
    engine = Engine(model_path=model_dir, max_total_tokens=1024)
    children = engine_children(os.getpid())
    assert len(children) == 2
    engine.shutdown()
    assert wait_gone(children, 5) == []
    engine.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate("hi")

    with Engine(model_path=model_dir, max_total_tokens=1024) as engine:
        children = engine_children(os.getpid())
        assert len(children) == 2
    assert wait_gone(children, 5) == []


def test_children_exit_when_the_parent_is_sigkilled(model_dir, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(
        "from radixfleet import Engine\n"
        f"e = Engine(model_path={model_dir!r}, max_total_tokens=1024)\n"
        "print('READY', flush=True)\n"
        "import time; time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "READY"
        children = engine_children(parent.pid)
        assert len(children) == 2
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        t0 = time.monotonic()
        assert wait_gone(children, 5) == []
        assert time.monotonic() - t0 < 5
    finally:
        parent.kill()


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_path=model_dir, max_total_tokens=2048, context_length=256) as e:
        yield e


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "hi", "input_ids": [1, 2]}, "either prompt or input_ids"),
    ({"input_ids": [1, 99999999]}, "outside the vocabulary"),
    ({"input_ids": [-1, 5]}, "outside the vocabulary"),
    ({"prompt": "word " * 400}, "context length"),
    ({"prompt": "hi", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"prompt": "hi", "sampling_params": {"temperature": -0.5}}, "temperature"),
    ({"prompt": "hi", "sampling_params": {"bogus": 1}}, "bogus"),
    ({"prompt": ["ok", ""]}, "prompt is empty"),
])
def test_bad_input_raises_value_error_and_the_engine_keeps_serving(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(**kwargs)
    out = engine.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 4})
    assert out["meta_info"]["completion_tokens"] == 4


def test_unknown_engine_argument_raises(model_dir):
    with pytest.raises(ValueError, match="unknown engine argument.*not_a_flag"):
        Engine(model_path=model_dir, not_a_flag=True)
    with pytest.raises(ValueError, match="schedule_policy"):
        Engine(model_path=model_dir, schedule_policy="random")


def test_abort_frees_the_request_and_reports_abort(engine):
    stream = engine.generate("Tell me a long story", {"max_new_tokens": 200, "ignore_eos": True}, stream=True)
    first = next(stream)
    engine.abort_request(first["meta_info"]["id"])
    rest = list(stream)
    assert rest[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert sum(len(c["output_ids"]) for c in [first, *rest]) < 200
    state = engine.get_server_info()["internal_states"][0]
    assert state["num_running_requests"] == 0 and state["kv_used_tokens"] == 0


def test_request_finishing_in_its_prefill_step_frees_its_slots_and_caches_its_prompt(engine):
    """Regression: a request done after one token never joined the running batch, so its
    table row and KV slots leaked and its prompt never reached the radix cache."""
    prompt = "A request that finishes after exactly one token"
    first = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 1})
    second = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 1})
    assert first["meta_info"]["completion_tokens"] == 1
    assert second["meta_info"]["cached_tokens"] > 0
    for _ in range(80):  # more than the table has rows
        engine.generate(prompt, {"max_new_tokens": 1})
    state = engine.get_server_info()["internal_states"][0]
    assert state["kv_used_tokens"] == 0 and state["num_running_requests"] == 0


def test_a_dead_scheduler_fails_pending_requests_instead_of_hanging(model_dir):
    """Regression: when the scheduler process crashed, callers waited forever."""
    with Engine(model_path=model_dir, max_total_tokens=1024) as engine:
        stream = engine.generate("Tell me a story", {"max_new_tokens": 500, "ignore_eos": True}, stream=True)
        next(stream)
        scheduler = [p for p in engine_children(os.getpid()) if p.pid == engine._procs[1].pid][0]
        scheduler.kill()
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="engine process died"):
            list(stream)
        assert time.monotonic() - t0 < 5
        with pytest.raises(RuntimeError, match="died"):
            engine.generate("hi")
