"""FP8 checkpoints and options on CPU: what loads, what is refused by name, and that an FP8
checkpoint written by ``radixfleet model fp8-export`` serves the same tokens and logprobs as
HF transformers on the dequantized weights (CPU engines dequantize fp8 weights at load; the
fp8 matmuls themselves are tested on the GPU, tests/gpu/test_fp8.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import make_tiny_model, runner_teacher_forced_logprobs
from safetensors.torch import load_file, save_file

from radixfleet.engine.config import ConfigError, EngineConfig
from radixfleet.engine.executor.model_runner import ModelRunner
from radixfleet.engine.layers import fp8
from radixfleet.engine.layers.linear import QKVParallelLinear, RowParallelLinear
from radixfleet.engine.models.fp8_export import export_fp8
from radixfleet.engine.models.quant_config import resolve_quantization


# ---- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize("qc,needle", [
    ({"quant_method": "gptq", "bits": 4}, "'gptq' is not supported"),
    ({"quant_method": "awq"}, "'awq' is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise FP8"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}},
     "4-bit int"),
    ({"quant_method": "compressed-tensors",
      "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "block"}}}},
     "strategy 'block'"),
])
def test_unsupported_checkpoint_quantization_is_refused_by_name(qc, needle):
    with pytest.raises(ValueError, match=needle):
        resolve_quantization(None, {"quantization_config": qc})


def test_supported_quantizations_resolve():
    assert resolve_quantization(None, {}) is None
    online = resolve_quantization("fp8", {})
    assert (online.method, online.prequantized, online.source) == ("fp8", False, "online")
    spec = resolve_quantization(None, {"quantization_config": {"quant_method": "fp8",
                                                               "activation_scheme": "static"}})
    assert spec.prequantized and spec.source == "fp8"


@pytest.mark.parametrize("kwargs,needle", [
    (dict(device="cpu", kv_cache_dtype="fp8_e4m3"), "needs CUDA"),
    (dict(attention_backend="torch_native", kv_cache_dtype="fp8_e4m3"), "torch_native"),
    (dict(device="cpu", quantization="fp8"), "needs a CUDA GPU with fp8"),
    (dict(quantization="int8"), "quantization must be one of fp8"),
    (dict(kv_cache_dtype="fp8_e5m2"), "kv_cache_dtype must be one of auto, fp8_e4m3"),
])
def test_engine_options_refused_with_reason(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        EngineConfig(model_path="x", **kwargs)


# ---- layer loaders -------------------------------------------------------------------------
def test_fused_qkv_takes_a_per_tensor_scale_per_shard():
    """q, k and v of one fused layer quantized with three different per-tensor scales: each
    shard's rows get their own scale, so the dequantized layer is the three weights stacked."""
    with fp8.fp8_weights():
        layer = QKVParallelLinear(64, head_dim=16, num_heads=4, num_kv_heads=2, bias=False)
    gen = torch.Generator().manual_seed(0)
    parts = {"q": torch.randn(64, 64, generator=gen), "k": torch.randn(32, 64, generator=gen) * 5,
             "v": torch.randn(32, 64, generator=gen) * 0.1}
    for shard, w in parts.items():
        scale = w.abs().max() / 448
        layer.weight_loader(layer.weight, (w / scale).to(fp8.FP8), shard)
        layer.weight_loader(layer.weight_scale, scale.reshape(()), shard)
    fp8.check_loaded(layer)
    real = fp8.dequantize(layer.weight.data, layer.weight_scale.data, torch.float32)
    want = torch.cat([parts["q"], parts["k"], parts["v"]])
    assert layer.weight.dtype == fp8.FP8
    assert torch.allclose(real, want, rtol=0.07, atol=1e-6)  # e4m3: 3 mantissa bits
    assert layer.weight_scale[64:96].unique().numel() == 1 and layer.weight_scale[0] != layer.weight_scale[64]


def test_bf16_weights_are_quantized_per_row_as_they_load():
    with fp8.fp8_weights():
        layer = RowParallelLinear(96, 40)
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(1))
    layer.weight_loader(layer.weight, w)
    want_q, want_s = fp8.quantize_rows(w)
    assert torch.equal(layer.weight.data.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(layer.weight_scale.data, want_s)
    y = layer(torch.randn(3, 96))  # CPU: the dequantized matmul
    assert y.shape == (3, 40)


def test_fp8_weight_without_its_scale_is_named():
    with fp8.fp8_weights():
        layer = RowParallelLinear(32, 16)
    layer.weight_loader(layer.weight, torch.zeros(16, 32, dtype=fp8.FP8))
    with pytest.raises(ValueError, match="has no weight_scale"):
        fp8.check_loaded(torch.nn.ModuleDict({"down_proj": layer}))
    with pytest.raises(ValueError, match="3 entries for a weight of 16 rows"):
        fp8.expand_scale(torch.ones(3), 16)


# ---- checkpoints end to end ----------------------------------------------------------------
def hf_logprobs_on_dequantized(src: str, ckpt: str, ids: list[int]) -> torch.Tensor:
    """HF transformers (fp32) on ``src``'s architecture with ``ckpt``'s fp8 weights dequantized."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tensors = load_file(f"{ckpt}/model.safetensors")
    state = model.state_dict()
    changed = 0
    for name, t in tensors.items():
        if t.dtype == fp8.FP8:
            scale = tensors[name.removesuffix("weight") + "weight_scale"]
            state[name] = fp8.dequantize(t, fp8.expand_scale(scale, t.shape[0]), torch.float32)
            changed += 1
    model.load_state_dict(state)
    assert changed > 0
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def cpu_runner(folder: str) -> ModelRunner:
    return ModelRunner(EngineConfig(model_path=folder, device="cpu", dtype="float32",
                                    max_total_tokens=2048, skip_tokenizer_init=True), folder)


@pytest.mark.parametrize("arch,scheme,fmt", [("llama3", "channel", "compressed-tensors"),
                                             ("qwen2", "tensor", "fp8"),
                                             ("qwen3", "tensor", "compressed-tensors")])
def test_exported_checkpoint_matches_hf_on_dequantized_weights(tmp_path, arch, scheme, fmt):
    src = make_tiny_model(arch, str(tmp_path / "src"))
    export_fp8(src, str(tmp_path / "fp8"), scheme=scheme, fmt=fmt, kv_scale=0.5)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == fmt
    ids = torch.randint(0, 512, (80,), generator=torch.Generator().manual_seed(2)).tolist()
    runner = cpu_runner(str(tmp_path / "fp8"))
    assert runner.quant is not None and runner.quant.source == fmt
    assert runner.kv_scales == {"k": {0: 0.5, 1: 0.5, 2: 0.5}, "v": {0: 0.5, 1: 0.5, 2: 0.5}}
    ours = runner_teacher_forced_logprobs(runner, ids)
    ref = hf_logprobs_on_dequantized(src, str(tmp_path / "fp8"), ids)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    assert (ours - ref).abs().max().item() < 1e-4
    # and quantization moved the model: the checkpoint is not the bf16 one in disguise
    plain = runner_teacher_forced_logprobs(cpu_runner(src), ids)
    assert (plain - ours).abs().max().item() > 1e-3


def test_default_model_fp8_checkpoint_loads_and_answers(tmp_path, model_dir):
    """The default model exported with the CLI, served on CPU: the same greedy answer."""
    from radixfleet.engine.engine import Engine

    out = subprocess.run([sys.executable, "-m", "radixfleet", "model", "fp8-export", model_dir,
                          str(tmp_path / "fp8")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "210 fp8 weights" in out.stdout
    params = {"temperature": 0, "max_new_tokens": 8}
    prompt = "The capital of France is"
    with Engine(model_path=str(tmp_path / "fp8")) as engine:
        got = engine.generate(prompt, params)["text"]
        assert engine.get_server_info()["quantization"] == "fp8"
    assert "Paris" in got
    again = subprocess.run([sys.executable, "-m", "radixfleet", "model", "fp8-export", str(tmp_path / "fp8"),
                            str(tmp_path / "twice")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already quantized" in again.stderr


def test_checkpoint_with_unsupported_method_is_refused_at_start(tmp_path):
    from radixfleet.engine.engine import Engine

    src = make_tiny_model("llama3", str(tmp_path / "m"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="'gptq' is not supported"):
        Engine(model_path=src, skip_tokenizer_init=True)


def test_missing_weight_scale_in_checkpoint_is_named(tmp_path):
    src = make_tiny_model("llama3", str(tmp_path / "src"))
    export_fp8(src, str(tmp_path / "fp8"))
    tensors = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.weight has no weight_scale"):
        cpu_runner(str(tmp_path / "fp8"))


def test_weight_update_from_an_fp8_folder_is_refused_where_weights_were_dequantized(tmp_path):
    """On CPU an FP8 checkpoint is dequantized at start, so a later FP8 folder would load
    without its scales: the update is refused and the weights stay as they were."""
    src = make_tiny_model("llama3", str(tmp_path / "src"))
    export_fp8(src, str(tmp_path / "fp8"))
    runner = cpu_runner(src)
    before = runner.model.layers[0].mlp.down_proj.weight.clone()
    ok, message = runner.update_weights(str(tmp_path / "fp8"), src)
    assert not ok and "FP8 checkpoint" in message
    assert torch.equal(runner.model.layers[0].mlp.down_proj.weight, before)
