"""Which weight quantization a model runs with: the engine's ``quantization`` option and the
checkpoint's ``quantization_config``, checked against what the engine can load.

Loaded: FP8 e4m3 linear weights with per-tensor or per-output-channel scales, in either
layout people download:

- ``quant_method: "fp8"`` (vLLM / AutoFP8 / transformers): ``<layer>.weight`` fp8,
  ``<layer>.weight_scale``, optional ``<layer>.input_scale``; ``activation_scheme`` dynamic or
  static.
- ``quant_method: "compressed-tensors"`` (llm-compressor) whose config groups quantize
  weights to 8-bit floats (``type: float``, ``strategy: tensor | channel``), same tensor names.

Activations are always quantized per token at run time (``layers/fp8.py``): a checkpoint's
static ``input_scale`` is read past, which costs nothing in accuracy (per-token scales are
at least as fine). Block-wise FP8 (``weight_block_size``) and every other method (GPTQ,
AWQ, int8, ...) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

QUANTIZATIONS = ("fp8",)
SUPPORTED_METHODS = ("fp8", "compressed-tensors")


@dataclass(frozen=True)
class QuantSpec:
    """``method``: the weight format (only "fp8"); ``prequantized``: the checkpoint holds fp8
    weights and scales (else bf16/fp32 weights are quantized as they load); ``source``: where
    it came from ("online", "fp8", "compressed-tensors")."""

    method: str
    prequantized: bool
    source: str


def _check_compressed_tensors(qc: dict[str, Any]) -> None:
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError("compressed-tensors checkpoint has no config_groups")
    for name, group in groups.items():
        weights = (group or {}).get("weights") or {}
        kind = (weights.get("type"), weights.get("num_bits"))
        if kind != ("float", 8):
            raise ValueError(f"compressed-tensors group {name!r} quantizes weights to "
                             f"{weights.get('num_bits')}-bit {weights.get('type')}: only 8-bit float "
                             "(FP8) weights are supported")
        strategy = weights.get("strategy", "tensor")
        if strategy not in ("tensor", "channel"):
            raise ValueError(f"compressed-tensors group {name!r} uses weight strategy {strategy!r}: "
                             "only per-tensor and per-channel FP8 scales are supported")
    fmt = qc.get("format", "float-quantized")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported (FP8 checkpoints are "
                         "'float-quantized')")


def resolve_quantization(requested: str | None, hf: dict[str, Any]) -> QuantSpec | None:
    """The quantization to run with, from the engine option and the checkpoint's config.json
    (``hf``); ``ValueError`` naming what is not supported."""
    if requested is not None and requested not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {requested!r}")
    qc = hf.get("quantization_config")
    if not qc:
        return QuantSpec("fp8", False, "online") if requested == "fp8" else None
    method = qc.get("quant_method")
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"checkpoint quantization method {method!r} is not supported; radixfleet "
                         f"loads {' and '.join(SUPPORTED_METHODS)} FP8 checkpoints")
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise ValueError(f"block-wise FP8 checkpoints (weight_block_size={qc['weight_block_size']}) "
                             "are not supported; use a per-tensor or per-channel FP8 checkpoint")
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8 activation_scheme {scheme!r} is not supported")
    else:
        _check_compressed_tensors(qc)
    return QuantSpec("fp8", True, method)
