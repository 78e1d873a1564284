"""FP8 (e4m3) linear weights: per-output-channel scales, and the matmuls that use them.

A quantized linear layer holds ``weight`` as ``float8_e4m3fn [N, K]`` and ``weight_scale``
as ``float32 [N, 1]``: row n of the real weight is ``weight[n] * weight_scale[n]``. Per-tensor
checkpoint scales are stored broadcast to every row of their shard, so fused projections
(qkv, gate_up) whose parts were quantized with different scales need no special case.

The matmul, by batch shape and device (``fp8_matmul``):

- CUDA, one row (batch-1 decode): the whole-row GEMV of ``kernels/gemv.py`` reads the fp8
  weight and applies the row scale in its epilogue; the activation stays in the model dtype.
  The step streams half the bytes of bf16.
- CUDA, more rows: the activation is quantized per token (``kernels/fp8_quant.py``: one
  scale per row, amax / 448) and ``torch._scaled_mm`` runs the fp8 tensor-core GEMM with
  row-wise scales on both sides, output in the model dtype.
- Anywhere else (CPU, or shapes ``_scaled_mm`` cannot take): dequantize and ``F.linear``.
  CPU engines dequantize once at load instead (``dequantize_model_``).

Layers are built quantized inside ``fp8_weights()`` (``build_model`` enters it when the
engine runs with ``quantization="fp8"`` or loads an FP8 checkpoint). Their weight loaders
take either fp8 checkpoint tensors (copied as stored; the scale comes from the checkpoint's
``weight_scale``) or higher-precision ones (quantized on the fly, row by row: that is
online quantization, and also what ``update_weights_from_disk`` with a bf16 folder does).
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero row gets this scale (its fp8 values are all zero anyway)

_scope = threading.local()


@contextlib.contextmanager
def fp8_weights():
    """Linear layers constructed inside this block hold fp8 weights (see the module docstring)."""
    previous = getattr(_scope, "on", False)
    _scope.on = True
    try:
        yield
    finally:
        _scope.on = previous


def building_fp8() -> bool:
    return getattr(_scope, "on", False)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` → ``(fp8 [N, K], scale fp32 [N, 1])`` with ``scale = amax(|row|) / 448``."""
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The real weight ``weight * scale`` in ``dtype`` (fp32 math, one rounding)."""
    return (weight.float() * scale).to(dtype)


def expand_scale(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A checkpoint's ``weight_scale`` (per tensor: ``[]``/``[1]``; per channel: ``[N]``/``[N, 1]``)
    as ``[rows, 1]`` fp32."""
    scale = scale.float().reshape(-1, 1)
    if scale.shape[0] == 1:
        return scale.expand(rows, 1)
    if scale.shape[0] != rows:
        raise ValueError(f"weight_scale has {scale.shape[0]} entries for a weight of {rows} rows: "
                         "expected one (per tensor) or one per output channel")
    return scale


def new_params(out_features: int, in_features: int, loader, scale_loader) -> tuple[nn.Parameter, nn.Parameter]:
    """Empty ``(weight fp8 [N, K], weight_scale fp32 [N, 1])`` on the current default device.
    Scales start as NaN: ``check_loaded`` finds an fp8 weight whose scale never arrived."""
    weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
    scale = nn.Parameter(torch.full((out_features, 1), float("nan"), dtype=torch.float32),
                         requires_grad=False)
    weight.weight_loader = loader  # type: ignore[attr-defined]
    weight.raw_checkpoint_dtype = True  # type: ignore[attr-defined]  # loaders see fp8 or bf16 as stored
    scale.weight_loader = scale_loader  # type: ignore[attr-defined]
    scale.raw_checkpoint_dtype = True  # type: ignore[attr-defined]
    scale.derived = True  # type: ignore[attr-defined]  # computed from bf16 weights when not in the checkpoint
    return weight, scale


def load_rows(weight: torch.Tensor, scale: torch.Tensor, rows: slice, loaded: torch.Tensor) -> None:
    """Write checkpoint rows ``loaded`` (this rank's slice, ``[n, K]``) into ``weight[rows]``:
    fp8 tensors as stored, anything else quantized per row (its scales into ``scale[rows]``)."""
    if loaded.dtype == FP8:
        weight.data[rows].copy_(loaded)
        return
    q, s = quantize_rows(loaded.to(weight.device))
    weight.data[rows].copy_(q)
    scale.data[rows].copy_(s)


def check_loaded(model: nn.Module) -> None:
    """``ValueError`` naming a layer whose fp8 weight has no scale (an fp8 checkpoint tensor
    without its ``weight_scale``)."""
    for name, module in model.named_modules():
        scale = getattr(module, "weight_scale", None)
        if scale is not None and bool(torch.isnan(scale).any()):
            raise ValueError(f"fp8 weight {name}.weight has no weight_scale in the checkpoint")


def dequantize_model_(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every fp8 weight by its dequantized ``dtype`` copy (CPU engines: fp8 compute
    needs a CUDA GPU of compute capability 8.9+). Returns how many layers changed."""
    count = 0
    for module in model.modules():
        scale = getattr(module, "weight_scale", None)
        if scale is None:
            continue
        module.weight = nn.Parameter(dequantize(module.weight.data, scale.data, dtype), requires_grad=False)
        module.weight_scale = None
        count += 1
    return count


def fp8_supported(device: torch.device) -> bool:
    """Hardware fp8 matmuls: CUDA with compute capability 8.9 (Ada) or newer."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 9)


@functools.cache
def _quant_kernel():
    from radixfleet.kernels.fp8_quant import per_token_quant_fp8

    return per_token_quant_fp8


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None, gemv=None) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` for ``x [M, K]`` in the model dtype; see the module
    docstring for the paths. ``gemv``: the batch-1 fp8 GEMV when the caller may use it."""
    n, k = weight.shape
    if gemv is not None:
        return gemv(x, weight, bias, w_scale=scale)
    if x.is_cuda and x.dtype != torch.float32 and k % 16 == 0 and n % 16 == 0:
        xq, x_scale = _quant_kernel()(x)
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.view(1, n),
                               out_dtype=x.dtype)
        return out if bias is None else out + bias
    return F.linear(x, dequantize(weight, scale, x.dtype), bias)
