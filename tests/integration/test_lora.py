"""LoRA adapters on the default model (CPU), against peft: every request of a mixed batch
(base model, adapter a, adapter b) generates what HF transformers generates with that
adapter merged into the weights (peft ``merge_and_unload``), with matching logprobs."""

from __future__ import annotations

import os
import threading

import httpx
import pytest
import torch
from helpers import make_adapter
from server_process import engine_server

from radixfleet import Engine
from radixfleet.engine.config import ConfigError

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
GREEDY = {"temperature": 0, "max_new_tokens": 16}
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("lora")
    refs = {None: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
            "a": make_adapter(model_dir, str(root / "a"), 1, ALL_TARGETS, 8),
            "b": make_adapter(model_dir, str(root / "b"), 2, ["q_proj", "v_proj", "down_proj"], 4,
                              use_rslora=True)}
    embed = make_adapter(model_dir, str(root / "embed"), 3, ["embed_tokens"], 4)
    del embed
    return {"a": str(root / "a"), "b": str(root / "b"), "embed": str(root / "embed"),
            "refs": refs, "tok": AutoTokenizer.from_pretrained(model_dir)}


def hf_greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def engine(model_dir, adapters):
    with Engine(model_path=model_dir, lora_paths=[f"a={adapters['a']}"], max_total_tokens=8192,
                allowed_local_paths=[os.path.dirname(adapters["a"])]) as e:
        yield e


def test_a_mixed_batch_matches_the_merged_models(engine, adapters):
    refs, tok = adapters["refs"], adapters["tok"]
    assert engine.load_lora_adapter("b", adapters["b"])[0]
    names = [None, "a", "b", "a", None, "b"]
    prompts = [PROMPTS[i % 3] for i in range(len(names))]
    outs = engine.generate(prompts, GREEDY, lora_path=names)
    for prompt, name, out in zip(prompts, names, outs, strict=True):
        assert out["output_ids"] == hf_greedy(refs[name], tok, prompt, 16), (name, prompt)
    assert outs[1]["output_ids"] != outs[0]["output_ids"]  # the adapter changes the answer
    assert engine.unload_lora_adapter("b")[0]


def test_logprobs_on_an_adapter_match_the_merged_model(engine, adapters):
    refs, tok = adapters["refs"], adapters["tok"]
    out = engine.generate(PROMPTS[1], GREEDY, lora_path="a", return_logprob=True, logprob_start_len=0)
    ids = tok(PROMPTS[1]).input_ids + out["output_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(refs["a"](torch.tensor([ids])).logits[0], -1)
    n = len(ids) - len(out["output_ids"])
    got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    want = [ref[n - 1 + k, t].item() for k, t in enumerate(out["output_ids"])]
    assert max(abs(g - w) for g, w in zip(got, want, strict=True)) < 1e-3
    got_in = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]]
    want_in = [ref[i - 1, ids[i]].item() for i in range(1, n)]
    assert max(abs(g - w) for g, w in zip(got_in, want_in, strict=True)) < 1e-3


def test_adapter_requests_never_reuse_base_model_kv(engine, adapters):
    """The radix cache holds the base model's KV: a prompt cached by a base request must be
    recomputed for an adapter request (else its answer would mix the two models)."""
    prompt = PROMPTS[2] + " and then"
    base = engine.generate(prompt, GREEDY)
    again = engine.generate(prompt, GREEDY)
    assert again["meta_info"]["cached_tokens"] > 0 and again["output_ids"] == base["output_ids"]
    on_a = engine.generate(prompt, GREEDY, lora_path="a")
    assert on_a["meta_info"]["cached_tokens"] == 0
    assert on_a["output_ids"] == hf_greedy(adapters["refs"]["a"], adapters["tok"], prompt, 16)
    streamed = [c["output_ids"] for c in engine.generate(prompt, GREEDY, lora_path="a", stream=True)]
    assert sum(streamed, []) == on_a["output_ids"]


def test_an_adapter_in_use_is_not_unloaded(engine, adapters):
    assert engine.load_lora_adapter("busy", adapters["b"])[0]
    long = {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True}
    worker = threading.Thread(target=engine.generate, args=(PROMPTS[0], long), kwargs={"lora_path": "busy"})
    worker.start()
    while engine.get_server_info()["internal_states"][0]["num_running_requests"] == 0:
        pass
    ok, message = engine.unload_lora_adapter("busy")
    assert not ok and "in use by 1 request" in message
    worker.join()
    assert engine.unload_lora_adapter("busy")[0]


def test_bad_adapters_and_names_are_refused(engine, adapters, tmp_path):
    ok, message = engine.load_lora_adapter("embed", adapters["embed"])
    assert not ok and "not supported" in message
    empty = os.path.join(os.path.dirname(adapters["a"]), "empty")
    os.makedirs(empty, exist_ok=True)
    ok, message = engine.load_lora_adapter("none", empty)
    assert not ok and "not a peft LoRA folder" in message
    with pytest.raises(ValueError, match="outside the allowed folders"):
        engine.load_lora_adapter("none", str(tmp_path))
    ok, message = engine.load_lora_adapter("a", adapters["b"])
    assert not ok and "already loaded" in message
    ok, message = engine.unload_lora_adapter("never")
    assert not ok and "unknown LoRA adapter 'never'" in message
    with pytest.raises(ValueError, match="unknown LoRA adapter 'zz'; loaded: a"):
        engine.generate(PROMPTS[0], GREEDY, lora_path="zz")
    with pytest.raises(ValueError, match="lora_path must be"):
        engine.generate(PROMPTS[:2], GREEDY, lora_path=["a"])
    assert engine.generate(PROMPTS[0], GREEDY, lora_path="a")["output_ids"]


def test_lora_with_tensor_parallelism_is_a_config_error(model_dir):
    with pytest.raises(ConfigError, match="tp_size 1 only"):
        Engine(model_path=model_dir, enable_lora=True, tp_size=2)


def test_http_routes_and_the_openai_lora_path(model_dir, adapters):
    refs, tok = adapters["refs"], adapters["tok"]
    with engine_server(model_dir, "--enable-lora", "--allowed-local-paths", os.path.dirname(adapters["b"])) as url:
        for outside in ("/tmp", os.path.join(adapters["b"], "..", "..")):
            forbidden = httpx.post(url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": outside},
                                   timeout=60)
            assert forbidden.status_code == 403, forbidden.text
            assert "outside the allowed folders" in forbidden.json()["error"]["message"]
        loaded = httpx.post(url + "/load_lora_adapter", json={"lora_name": "b", "lora_path": adapters["b"]},
                            timeout=60)
        assert loaded.status_code == 200 and loaded.json()["success"], loaded.text
        native = httpx.post(url + "/generate", json={"text": PROMPTS[0], "sampling_params": GREEDY,
                                                     "lora_path": "b"}, timeout=120).json()
        assert native["output_ids"] == hf_greedy(refs["b"], tok, PROMPTS[0], 16)
        completion = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 16,
                                                               "temperature": 0, "lora_path": "b"}, timeout=120)
        assert completion.json()["choices"][0]["text"] == native["text"]
        unknown = httpx.post(url + "/generate", json={"text": "Hi", "lora_path": "zz"}, timeout=60)
        assert unknown.status_code == 400 and "unknown LoRA adapter" in unknown.json()["error"]["message"]
        gone = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "b"}, timeout=60)
        assert gone.status_code == 200 and gone.json()["success"]
        again = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "b"}, timeout=60)
        assert again.status_code == 400 and not again.json()["success"]
