"""FP8 at the model runner: which KV-cache dtype and weight format a runner uses, and the
checkpoint tensors that are not parameters (KV-cache scales, static input scales).

- ``kv_cache_dtype="fp8_e4m3"``: CUDA only, with the triton or flashinfer backend (the
  torch_native backend is the CPU and reference path and is kept exact). The pool then
  holds twice the tokens for the same memory (``memory/kv_pool.py``).
- Weights (``models/quant_config.py`` decides the format): on a GPU with hardware fp8
  (compute capability 8.9+), linear layers keep fp8 weights (``layers/fp8.py``). Elsewhere an
  FP8 *checkpoint* still loads: its weights are dequantized once to the model dtype, so a
  laptop can serve the checkpoint a GPU fleet runs; online ``quantization="fp8"`` is refused
  there, since it would only lose accuracy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

import torch

from radixfleet.engine.config import ConfigError, EngineConfig
from radixfleet.engine.layers import fp8
from radixfleet.engine.models.model_config import ModelConfig
from radixfleet.engine.models.quant_config import QuantSpec, resolve_quantization

logger = logging.getLogger(__name__)

# Checkpoint names of per-layer KV-cache scales: compressed-tensors / current vLLM
# (`self_attn.k_scale`), and the older vLLM fp8 layout (`self_attn.k_proj.output_scale`).
_KV_SCALE = re.compile(r"layers\.(\d+)\.self_attn\.(?:(k|v)_scale|(k|v)_proj\.output_scale)$")


def resolve_kv_cache_dtype(config: EngineConfig, device: torch.device, backend: str,
                           model_dtype: torch.dtype) -> torch.dtype:
    if config.kv_cache_dtype == "auto":
        return model_dtype
    if device.type != "cuda":
        raise ConfigError(f"kv_cache_dtype={config.kv_cache_dtype!r} needs a CUDA GPU (the triton or "
                          "flashinfer attention backend); on CPU use kv_cache_dtype='auto'")
    if backend == "torch_native":
        raise ConfigError(f"kv_cache_dtype={config.kv_cache_dtype!r} is not implemented by the "
                          "torch_native attention backend; use attention_backend='triton' or 'flashinfer'")
    return torch.float8_e4m3fn


def resolve_weight_quantization(config: EngineConfig, model_config: ModelConfig,
                                device: torch.device) -> tuple[QuantSpec | None, bool]:
    """``(spec, fp8_compute)``: the weight format (None: plain weights) and whether the layers
    keep fp8 weights (else an FP8 checkpoint is dequantized at load)."""
    try:
        spec = resolve_quantization(config.quantization, model_config.hf)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if spec is None:
        return None, False
    compute = fp8.fp8_supported(device)
    if not compute and not spec.prequantized:
        where = "this GPU" if device.type == "cuda" else "CPU"
        raise ConfigError(f"quantization='fp8' needs fp8 matmuls (a CUDA GPU of compute capability "
                          f"8.9+: Ada, Hopper or newer), which {where} lacks; serve the model unquantized")
    if not compute:
        logger.warning("FP8 checkpoint on %s: weights are dequantized to %s at load (fp8 matmuls need "
                       "CUDA compute capability 8.9+)", device.type, config.dtype)
    return spec, compute


def split_checkpoint(weights: Iterable[tuple[str, torch.Tensor]],
                     kv_scales: dict[str, dict[int, float]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's parameter tensors; KV-cache scales go into ``kv_scales`` (``{"k": {layer:
    scale}, "v": {...}}``) and static activation scales (``input_scale``) are dropped: the fp8
    matmul quantizes activations per token (``layers/fp8.py``)."""
    for name, tensor in weights:
        if name.endswith(".input_scale"):
            continue
        m = _KV_SCALE.search(name)
        if m:
            kind = m.group(2) or m.group(3)
            kv_scales.setdefault(kind, {})[int(m.group(1))] = float(tensor.float().max())
            continue
        yield name, tensor


def randomize(model: torch.nn.Module) -> None:
    """``load_format="dummy"``: N(0, 0.02) weights (quantized per row where the layer is fp8),
    norm scales 1."""
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif leaf == "weight_scale":
            continue  # set with its weight
        elif p.dtype == fp8.FP8:
            fp8.load_rows(p, module.weight_scale, slice(None),
                          torch.randn(p.shape, device=p.device, dtype=torch.float32) * 0.02)
        else:
            p.data.normal_(0, 0.02)
