"""Tensor parallelism on CPU (gloo): a model split over 2, 3 or 4 scheduler-side ranks gives
the greedy output of one rank, also when the ranks are spread over two "nodes" of one host;
every rank ends with the engine; configurations that cannot split raise ValueError."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from helpers import make_tiny_model

from radixfleet.engine.engine import Engine
from radixfleet.engine.managers.launch import free_port

PROMPTS = [[5, 17, 99, 3, 250, 8, 41], list(range(10, 70)), [7] * 33, [300, 301]]
GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}


def engine_children(pid: int, recursive: bool = True) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=recursive)
            if "radixfleet.engine.managers.launch" in " ".join(p.cmdline())]


def still_running(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """``procs`` that have not exited within ``timeout`` (a zombie has: only its parent,
    another process here, can reap it)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def greedy(engine: Engine, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]


def hf_greedy_ids(folder: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
            outs.append(out[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_model("llama3", str(tmp_path_factory.mktemp("tp-llama3")))


@pytest.fixture(scope="module")
def tiny_llama_tp1(tiny_llama) -> list[list[int]]:
    with Engine(model_path=tiny_llama, max_total_tokens=2048, skip_tokenizer_init=True) as engine:
        return greedy(engine)


def test_tiny_llama_tp2_matches_tp1_and_hf_with_chunking_cache_hits_and_logprobs(tiny_llama, tiny_llama_tp1):
    assert tiny_llama_tp1 == hf_greedy_ids(tiny_llama, PROMPTS, GREEDY["max_new_tokens"])
    logprob_prompt = list(range(100, 140))
    with Engine(model_path=tiny_llama, max_total_tokens=2048, skip_tokenizer_init=True,
                disable_radix_cache=True) as engine:
        ref_lp = engine.generate(input_ids=logprob_prompt, sampling_params=GREEDY, return_logprob=True,
                                 logprob_start_len=0, top_logprobs_num=2)["meta_info"]
    with Engine(model_path=tiny_llama, tp_size=2, max_total_tokens=2048, skip_tokenizer_init=True,
                chunked_prefill_size=24) as engine:
        assert len(engine_children(os.getpid())) == 3  # detokenizer + 2 ranks
        assert greedy(engine) == tiny_llama_tp1  # prompts longer than 24 tokens are chunked
        again = engine.generate(input_ids=PROMPTS[1], sampling_params=GREEDY)
        assert again["meta_info"]["cached_tokens"] > 0  # an extend after a cached prefix
        assert again["output_ids"] == tiny_llama_tp1[1]
        # Prompt logprobs take the LM head on the followers too, in chunks of their own.
        lp = engine.generate(input_ids=logprob_prompt, sampling_params=GREEDY, return_logprob=True,
                             logprob_start_len=0, top_logprobs_num=2)["meta_info"]
        # Rank 0 stops its followers and exits by itself, within the 5 s grace it is given.
        t0 = time.monotonic()
        engine.shutdown()
        assert time.monotonic() - t0 < 3
    for key in ("input_token_logprobs", "output_token_logprobs"):
        assert [t for _, t, _ in lp[key]] == [t for _, t, _ in ref_lp[key]]
        got = [v for v, _, _ in lp[key] if v is not None]
        want = [v for v, _, _ in ref_lp[key] if v is not None]
        assert got == pytest.approx(want, abs=1e-4)


def test_tp4_replicates_kv_heads_and_matches_tp1(tmp_path):
    """qwen2 (q/k/v bias, tied embeddings) has 2 kv heads: over 4 ranks each is replicated."""
    folder = make_tiny_model("qwen2", str(tmp_path / "qwen2"))
    outs = {}
    for tp in (1, 4):
        with Engine(model_path=folder, tp_size=tp, max_total_tokens=1024, skip_tokenizer_init=True) as engine:
            outs[tp] = greedy(engine, PROMPTS[:2])
    assert outs[4] == outs[1]


@pytest.mark.parametrize("arch, tp", [("qwen2_moe", 4), ("qwen3_moe", 2)])
def test_moe_split_over_ranks_matches_hf(tmp_path, arch, tp):
    """Experts split along their intermediate dimension (Qwen2-MoE's shared expert too, and
    its dense layer); tp 4 replicates qwen2_moe's 2 kv heads. (Mixtral's experts split by the
    same code: tests/unit/test_moe_layer.py; Phi-3 over 2 ranks: test_sliding_window.py.)"""
    folder = make_tiny_model(arch, str(tmp_path / arch))
    with Engine(model_path=folder, tp_size=tp, dtype="float32", max_total_tokens=1024, skip_tokenizer_init=True,
                chunked_prefill_size=24) as engine:
        assert greedy(engine, PROMPTS[:3]) == hf_greedy_ids(folder, PROMPTS[:3], GREEDY["max_new_tokens"])


def test_smollm2_tp3_matches_tp1(model_dir):
    """9 attention heads and 3 kv heads over 3 ranks: 3 q heads and 1 kv head each."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
    params = {"temperature": 0, "max_new_tokens": 16}
    outs = {}
    for tp in (1, 3):
        with Engine(model_path=model_dir, tp_size=tp, max_total_tokens=1024) as engine:
            outs[tp] = [(o["output_ids"], o["text"]) for o in engine.generate(prompts, params)]
    assert outs[3] == outs[1]


NODE1 = """
import sys, time
from radixfleet.engine.engine import Engine
engine = Engine(model_path={folder!r}, tp_size=2, nnodes=2, node_rank=1, dist_init_addr={addr!r},
                max_total_tokens=2048, skip_tokenizer_init=True)
try:
    engine.generate(input_ids=[1, 2, 3])
except RuntimeError as e:
    print("GENERATE:", e, flush=True)
print("READY", flush=True)
time.sleep(600)
"""


def test_two_nodes_on_one_host_match_tp1_and_every_rank_ends(tiny_llama, tiny_llama_tp1):
    addr = f"127.0.0.1:{free_port()}"
    node1 = subprocess.Popen([sys.executable, "-c", NODE1.format(folder=tiny_llama, addr=addr)],
                             stdout=subprocess.PIPE, text=True)
    try:
        with Engine(model_path=tiny_llama, tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr,
                    max_total_tokens=2048, skip_tokenizer_init=True) as engine:
            ours = engine_children(os.getpid(), recursive=False)
            assert len(ours) == 2  # detokenizer + rank 0
            assert greedy(engine) == tiny_llama_tp1
            # Node 1 reports ready once rank 0 is up, which the engine above waited for.
            lines = [node1.stdout.readline().strip() for _ in range(2)]
            assert "node_rank 1" in lines[0] and "node_rank 0" in lines[0], lines
            assert lines[1] == "READY"
            theirs = engine_children(node1.pid)
            assert len(theirs) == 1
        # Rank 0 told node 1's rank to stop before it exited.
        assert still_running(ours + theirs, 10) == []
        os.kill(node1.pid, signal.SIGTERM)
        node1.wait(10)
    finally:
        node1.kill()


def test_serve_on_node_rank_1_runs_until_node_0_stops_it(tiny_llama, tiny_llama_tp1):
    addr = f"127.0.0.1:{free_port()}"
    serve = subprocess.Popen([sys.executable, "-m", "radixfleet.engine.server.serve", "--model-path", tiny_llama,
                              "--tp-size", "2", "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", addr,
                              "--max-total-tokens", "2048", "--skip-tokenizer-init"])
    try:
        with Engine(model_path=tiny_llama, tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr,
                    max_total_tokens=2048, skip_tokenizer_init=True) as engine:
            assert greedy(engine, PROMPTS[:1]) == tiny_llama_tp1[:1]
            assert serve.poll() is None
        assert serve.wait(15) == 0
    finally:
        serve.kill()


NODE0 = """
import time
from radixfleet.engine.engine import Engine
engine = Engine(model_path={folder!r}, tp_size=2, nnodes=2, node_rank=0, dist_init_addr={addr!r},
                max_total_tokens=2048, skip_tokenizer_init=True)
print(engine.generate(input_ids=[1, 2, 3], sampling_params={{"max_new_tokens": 4}})["output_ids"], flush=True)
time.sleep(600)
"""


def test_serve_on_node_rank_1_exits_with_an_error_when_node_0_dies(tiny_llama):
    """The operator restarts a multi-node group's pods on exit: a rank whose rank 0 is gone
    must not wait for it forever."""
    addr = f"127.0.0.1:{free_port()}"
    serve = subprocess.Popen([sys.executable, "-m", "radixfleet.engine.server.serve", "--model-path", tiny_llama,
                              "--tp-size", "2", "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", addr,
                              "--max-total-tokens", "2048", "--skip-tokenizer-init"], stderr=subprocess.DEVNULL)
    node0 = subprocess.Popen([sys.executable, "-c", NODE0.format(folder=tiny_llama, addr=addr)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert len(json.loads(node0.stdout.readline())) == 4
        os.kill(node0.pid, signal.SIGKILL)
        assert serve.wait(30) == 1
    finally:
        serve.kill()
        node0.kill()


def test_node_rank_1_ranks_exit_when_its_parent_is_killed(tiny_llama):
    """A node > 0 engine whose process dies (here: before node 0 ever starts) leaves no rank."""
    addr = f"127.0.0.1:{free_port()}"
    node1 = subprocess.Popen([sys.executable, "-c", NODE1.format(folder=tiny_llama, addr=addr)],
                             stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not engine_children(node1.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = engine_children(node1.pid)
        assert len(ranks) == 1  # waiting for rank 0 at the rendezvous
        node1.kill()
        node1.wait()
        assert still_running(ranks, 5) == []
    finally:
        node1.kill()


def _config_only_model(folder, **fields) -> str:
    """A model folder with only config.json: enough for the checks made before any process starts."""
    os.makedirs(folder, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 128,
              "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4,
              "num_key_value_heads": 2, **fields}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


@pytest.mark.parametrize("fields, kwargs, message", [
    ({}, {"tp_size": 3}, r"num_attention_heads \(4\)"),
    ({"num_attention_heads": 6, "num_key_value_heads": 6, "intermediate_size": 250}, {"tp_size": 3},
     r"intermediate_size \(250\)"),
    ({"num_attention_heads": 12, "num_key_value_heads": 3, "intermediate_size": 240}, {"tp_size": 4},
     r"num_key_value_heads \(3\)"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "moe_intermediate_size": 90, "num_experts": 4,
      "num_experts_per_tok": 2}, {"tp_size": 4}, r"moe_intermediate_size \(90\)"),
    ({}, {"tp_size": 3, "nnodes": 2, "dist_init_addr": "127.0.0.1:1234"}, "multiple of nnodes"),
    ({}, {"tp_size": 2, "nnodes": 2}, "dist_init_addr"),
    ({}, {"tp_size": 2, "nnodes": 2, "dist_init_addr": "somehost"}, "host:port"),
    ({}, {"tp_size": 2, "device": "cuda:1"}, "one per rank"),
])
def test_configs_that_cannot_split_raise_value_error(tmp_path, fields, kwargs, message):
    folder = _config_only_model(tmp_path / "m", **fields)
    with pytest.raises(ValueError, match=message):
        Engine(model_path=folder, **kwargs)
    assert engine_children(os.getpid()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_tp_on_cuda_without_a_gpu_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        Engine(model_path=_config_only_model(tmp_path / "m"), tp_size=2, device="cuda")


def test_smollm2_heads_do_not_split_over_2(model_dir):
    with pytest.raises(ValueError, match=r"num_attention_heads \(9\)"):
        Engine(model_path=model_dir, tp_size=2)
