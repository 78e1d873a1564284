"""Write an FP8 checkpoint from a bf16/fp32 one: ``radixfleet model fp8-export SRC DST``.

The decoder layers' linear weights (q/k/v/o, gate/up/down) become fp8 e4m3 with a
``weight_scale`` per output channel (``[N, 1]``, ``amax(|row|) / 448``: exactly what
``quantization="fp8"`` computes at load) or per tensor (one scale, ``amax / 448``). Embeddings,
norms and the LM head stay as they are. ``config.json`` gets the ``quantization_config`` of
the chosen layout (``compressed-tensors``, llm-compressor's; or ``fp8``, vLLM/AutoFP8's), so
radixfleet, vLLM and SGLang load the result. ``--kv-scale`` adds per-layer KV-cache scales
(``self_attn.k_scale`` / ``v_scale``) for ``kv_cache_dtype="fp8_e4m3"``.

No calibration data is used: weights are quantized from their own range, activations are
left to per-token dynamic quantization.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from radixfleet.engine.layers.fp8 import FP8, FP8_MAX, quantize_rows

_LINEAR = re.compile(r"layers\.(\d+)\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight$")
SCHEMES = ("channel", "tensor")
FORMATS = ("compressed-tensors", "fp8")


def quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor: ``(fp8 weight, scale [])`` with ``scale = amax / 448``."""
    w = w.float()
    scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantization_config(scheme: str, fmt: str, kv_scales: bool) -> dict[str, Any]:
    if fmt == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic"}
    float8 = {"num_bits": 8, "type": "float", "symmetric": True}
    config: dict[str, Any] = {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "quantization_status": "compressed", "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {**float8, "strategy": scheme, "dynamic": False},
            "input_activations": {**float8, "strategy": "token", "dynamic": True},
        }},
    }
    if kv_scales:
        config["kv_cache_scheme"] = {**float8, "strategy": "tensor", "dynamic": False}
    return config


def export_fp8(src: str, dst: str, scheme: str = "channel", fmt: str = "compressed-tensors",
               kv_scale: float | None = None, device: str = "cpu") -> list[str]:
    """Write the FP8 checkpoint of HF folder ``src`` into ``dst``; returns the quantized
    tensor names. ``ValueError`` for an unknown scheme or format, or a folder without weights.
    ``device``: where the weights are quantized (a GPU's fp32 -> e4m3 rounding can differ from
    the CPU's in the last bit; quantize where ``quantization="fp8"`` would run for bit-identical
    weights)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
    tensors: dict[str, torch.Tensor] = {}
    quantized, layers = [], set()
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {src!r}")
    source = {name: t for path in files for name, t in load_file(path).items()}
    for name, tensor in source.items():
        m = _LINEAR.search(name)
        if m is None:
            tensors[name] = tensor.contiguous()
            continue
        layers.add(int(m.group(1)))
        tensor = tensor.to(device)
        if scheme == "channel":
            weight, scale = quantize_rows(tensor)
        else:
            weight, scale = quantize_tensor(tensor)
            scale = scale.reshape(1) if fmt == "compressed-tensors" else scale.reshape(())
        weight, scale = weight.cpu(), scale.cpu()
        base = name.removesuffix(".weight")
        tensors[name], tensors[base + ".weight_scale"] = weight.contiguous(), scale.float().contiguous()
        quantized.append(name)
    if not quantized:
        raise ValueError(f"no decoder linear weights found in {src}")
    if kv_scale is not None:
        for layer in sorted(layers):
            for kind in ("k", "v"):
                tensors[f"model.layers.{layer}.self_attn.{kind}_scale"] = torch.tensor(float(kv_scale))
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    config["quantization_config"] = quantization_config(scheme, fmt, kv_scale is not None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for entry in os.listdir(src):  # tokenizer, chat template, generation config
        if not entry.endswith(".safetensors") and entry not in ("config.json", "model.safetensors.index.json"):
            path = os.path.join(src, entry)
            if os.path.isfile(path):
                shutil.copy(path, os.path.join(dst, entry))
    return quantized
