"""``update_weights_from_disk`` / ``get_weights_by_name`` (Engine and HTTP) on tiny random
Llama models (CPU): after an update the engine generates what HF transformers generates on
the new folder; incompatible or broken folders are refused and the old weights keep serving;
a request already running finishes on the weights it started with."""

from __future__ import annotations

import os
import shutil
import threading

import httpx
import pytest
import torch
from helpers import make_tiny_model
from safetensors.torch import load_file, save_file
from server_process import engine_server

from radixfleet import Engine

PROMPT = [5, 17, 99, 3, 250, 8, 41]
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


def hf_greedy(folder: str, prompt: list[int], n: int) -> list[int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def reseeded(src: str, dst: str, seed: int) -> str:
    """A copy of ``src`` with every weight matrix redrawn: same shapes, different model."""
    shutil.copytree(src, dst)
    tensors = load_file(f"{dst}/model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if t.dim() == 2:
            tensors[name] = torch.randn(t.shape, generator=gen) * 0.08
    save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    a = make_tiny_model("llama3", str(root / "a"))
    b = reseeded(a, str(root / "b"), 1)
    wider = make_tiny_model("llama3", str(root / "wider"), hidden_size=192)
    broken = reseeded(a, str(root / "broken"), 2)
    tensors = load_file(f"{broken}/model.safetensors")
    del tensors["model.layers.2.mlp.down_proj.weight"]
    save_file(tensors, f"{broken}/model.safetensors", metadata={"format": "pt"})
    return {"a": a, "b": b, "wider": wider, "broken": broken}


def generate(engine: Engine) -> list[int]:
    return engine.generate(input_ids=PROMPT, sampling_params=GREEDY)["output_ids"]


def test_update_swaps_in_the_new_model_and_refuses_bad_folders(folders):
    want_a, want_b = (hf_greedy(folders[k], PROMPT, 12) for k in ("a", "b"))
    assert want_a != want_b
    with Engine(model_path=folders["a"], max_total_tokens=2048, skip_tokenizer_init=True,
                allowed_local_paths=[os.path.dirname(folders["a"])]) as engine:
        assert generate(engine) == want_a
        before = engine.get_weights_by_name("model.layers.0.mlp.down_proj.weight", 8)
        ok, message = engine.update_weights_from_disk(folders["b"])
        assert ok, message
        assert engine.model_path == folders["b"]
        assert generate(engine) == want_b  # the prompt's cached KV was from model a: flushed
        after = engine.get_weights_by_name("layers.0.mlp.down_proj.weight", 8)
        assert len(after) == 8 and after != before

        ok, message = engine.update_weights_from_disk(folders["wider"])
        assert not ok and "hidden_size=192" in message
        ok, message = engine.update_weights_from_disk(folders["broken"])
        assert not ok and "previous weights were restored" in message
        ok, message = engine.update_weights_from_disk(os.path.join(os.path.dirname(folders["a"]), "none"))
        assert not ok and "not a folder" in message
        with pytest.raises(ValueError, match="outside the allowed folders"):
            engine.update_weights_from_disk("/no/such/folder")
        assert generate(engine) == want_b
        assert engine.get_weights_by_name("layers.0.mlp.down_proj.weight", 8) == after
        with pytest.raises(ValueError, match="no parameter 'nope'"):
            engine.get_weights_by_name("nope")


def test_a_running_request_finishes_on_its_weights(folders):
    """The update waits for the request in flight; the one sent during the update runs on
    the new weights."""
    long = {**GREEDY, "max_new_tokens": 120}
    want_a = hf_greedy(folders["a"], PROMPT, 120)
    with Engine(model_path=folders["a"], max_total_tokens=2048, skip_tokenizer_init=True,
                allowed_local_paths=[os.path.dirname(folders["a"])]) as engine:
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(
            out=engine.generate(input_ids=PROMPT, sampling_params=long)))
        worker.start()
        while engine.get_server_info()["internal_states"][0]["num_running_requests"] == 0:
            pass
        ok, _ = engine.update_weights_from_disk(folders["b"])
        worker.join()
        assert ok
        assert result["out"]["output_ids"] == want_a
        assert generate(engine) == hf_greedy(folders["b"], PROMPT, 12)


def test_http_routes(folders):
    with engine_server(folders["a"], "--skip-tokenizer-init", "--allowed-local-paths",
                       os.path.dirname(folders["a"])) as url:
        resp = httpx.post(url + "/update_weights_from_disk", json={"model_path": folders["b"]}, timeout=120)
        assert resp.status_code == 200 and resp.json()["success"], resp.text
        out = httpx.post(url + "/generate", json={"input_ids": PROMPT, "sampling_params": GREEDY}, timeout=60)
        assert out.json()["output_ids"] == hf_greedy(folders["b"], PROMPT, 12)
        refused = httpx.post(url + "/update_weights_from_disk", json={"model_path": folders["wider"]}, timeout=60)
        assert refused.status_code == 400 and not refused.json()["success"]
        assert "hidden_size" in refused.json()["message"]
        for outside in ("/etc", os.path.join(folders["a"], "..", "..")):
            forbidden = httpx.post(url + "/update_weights_from_disk", json={"model_path": outside}, timeout=60)
            assert forbidden.status_code == 403, forbidden.text
            assert "outside the allowed folders" in forbidden.json()["error"]["message"]
        bad = httpx.post(url + "/update_weights_from_disk", json={"path": "x"}, timeout=60)
        assert bad.status_code == 400 and "model_path" in bad.json()["error"]["message"]
        values = httpx.post(url + "/get_weights_by_name", json={"name": "layers.1.self_attn.o_proj.weight",
                                                                 "truncate_size": 4}, timeout=60)
        assert values.status_code == 200 and len(values.json()) == 4
        missing = httpx.post(url + "/get_weights_by_name", json={"name": "nope"}, timeout=60)
        assert missing.status_code == 400 and "no parameter" in missing.json()["error"]["message"]
