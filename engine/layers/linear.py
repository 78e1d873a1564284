"""Tensor-parallel linear layers. With tp_size 1 they are plain ``x @ W.T + b``.

Column-parallel layers shard the output dimension (no communication); row-parallel layers
shard the input dimension and all-reduce their output. Each parameter carries a
``weight_loader(param, loaded, shard_id)`` that copies this rank's slice of a checkpoint tensor.

On CPU, ``prepack_cpu_weights`` switches every linear layer of a loaded model (and the LM
head) to oneDNN's prepacked-weight matmul: the weight is reordered once into the blocked
layout oneDNN's AVX-512 kernels read, instead of on every call. For SmolLM2 at 16 rows (a
decode step of 16 requests) the 120 layer matmuls take 29–35 ms instead of 56–65 ms and the
LM head 6–7.5 ms instead of 19–22 ms on the 2-core development machine
(``benchmarks/cpu_matmul.py``). ``RADIXFLEET_CPU_PREPACK=0``
turns it off. Results agree with ``F.linear`` to fp32 rounding (~1e-6 relative). bf16
weights (the CPU default where bf16 is native) are prepacked the same way: oneDNN's
AVX512_BF16/AMX kernels take half the weight bytes and about half the time of fp32 at a
decode step's row counts (one thread, 16 rows: the layer matmuls 12 ms instead of 25 ms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixfleet import env_vars
from radixfleet.engine.executor.lora import lora_delta
from radixfleet.engine.layers import distributed as dist
from radixfleet.engine.layers import fp8
from radixfleet.engine.layers.fused import fused_ops

# Batch-1 GEMVs up to this many weight elements use kernels/gemv.py (with the norm or SiLU-mul
# before them folded in). On an H200 at Llama-3.1-8B's shapes its whole-row kernel beats or
# matches cuBLAS on every layer projection (qkv, o_proj, gate_up, down) but not on the LM
# head (128256x4096), which stays on cuBLAS (`benchmarks/kernel_bench.py --only gemv`; NOTES.md).
# RADIXFLEET_GEMV_MAX_ELEMENTS overrides it (tuning for other GPUs).
_GEMV_MAX_ELEMENTS = env_vars.GEMV_MAX_ELEMENTS.get()


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _gemv_ops(x: torch.Tensor, weight: torch.Tensor):
    """The fused-kernel namespace when ``x @ weight.T`` is a batch-1 GEMV the triton kernels
    take (one contiguous half-precision row, rows of ``weight`` contiguous, ``weight`` in x's
    dtype or fp8), else None."""
    if (x.dim() == 2 and x.shape[0] == 1 and x.is_cuda and x.dtype != torch.float32
            and weight.dtype in (x.dtype, fp8.FP8) and weight.stride(1) == 1 and x.is_contiguous()
            and weight.numel() <= _GEMV_MAX_ELEMENTS):
        return fused_ops(x)
    return None


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, through the prepacked oneDNN weight when there is one;
    with ``scale``, ``weight`` is fp8 and the real weight is ``weight * scale`` (``fp8.py``)."""
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    ops = _gemv_ops(x, weight)
    if scale is not None:
        return fp8.fp8_matmul(x, weight, scale, bias, ops.gemv if ops is not None else None)
    if ops is not None and ops.gemv is not None:  # batch-1 decode: kernels/gemv.py
        return ops.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's prepacked copy of an fp32 or bf16 CPU weight; None for any other weight, and
    for bf16 on a CPU without oneDNN's bf16 support (AVX-512 BW/VL/DQ or AVX-NE-CONVERT):
    oneDNN refuses to pack it there, and ``F.linear`` computes it."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def prepack_cpu_weights(model: nn.Module) -> int:
    """Give every module with a ``pack_cpu_weight`` method (the linear layers and the LM head)
    a oneDNN-prepacked copy of its fp32 CPU weight. Returns how many were packed; 0 where
    oneDNN is unavailable (the layers then keep using ``F.linear``)."""
    if not _onednn_linear_available() or not env_vars.CPU_PREPACK.get():
        return 0
    count = 0
    for module in model.modules():
        pack = getattr(module, "pack_cpu_weight", None)
        if pack is not None and pack():
            count += 1
    return count


class PackableWeight(nn.Module):
    """The optional prepacked CPU copy of ``weight``: shared by the linear layers and the LM head."""

    weight: nn.Parameter
    packed: torch.Tensor | None = None
    lora_state = None  # set on the projections adapters may target (engine/executor/lora.py)

    def pack_cpu_weight(self) -> bool:
        self.packed = pack_weight(self.weight)
        return self.packed is not None

    def lora_on(self) -> bool:
        """This step has requests on LoRA adapters: the fused norm/activation paths are off."""
        return self.lora_state is not None and self.lora_state.active

    def _with_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lora_delta(self, x, y) if self.lora_on() else y


def _param(shape: tuple[int, ...], loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


class ColumnParallelLinear(PackableWeight):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        tp = dist.tp_size()
        assert out_features % tp == 0, f"{out_features} output features do not split over tp={tp}"
        self.out_per_rank = out_features // tp
        if fp8.building_fp8():
            self.weight, self.weight_scale = fp8.new_params(self.out_per_rank, in_features,
                                                            self.weight_loader, self.weight_loader)
        else:
            self.weight = _param((self.out_per_rank, in_features), self.weight_loader)
            self.register_parameter("weight_scale", None)  # fp8 layers: [N, 1] fp32 (layers/fp8.py)
        self.bias = _param((self.out_per_rank,), self.weight_loader) if bias else None

    def shard_rows(self, shard_id) -> tuple[int, int, int]:
        """``(offset, size, start)``: checkpoint rows ``[start, start + size)`` of shard
        ``shard_id`` go to this rank's rows ``[offset, offset + size)``."""
        return 0, self.out_per_rank, dist.tp_rank() * self.out_per_rank

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Weight, bias and (fp8) weight_scale rows of one checkpoint tensor."""
        offset, size, start = self.shard_rows(shard_id)
        rows = slice(offset, offset + size)
        if param is self.weight_scale:
            scale = loaded.float().reshape(-1, 1)
            param.data[rows].copy_(scale.expand(size, 1) if scale.shape[0] == 1
                                   else scale.narrow(0, start, size))
        elif param is self.weight and self.weight_scale is not None:
            fp8.load_rows(param, self.weight_scale, rows, loaded.narrow(0, start, size))
        else:
            param.data[rows].copy_(loaded.narrow(0, start, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_lora(x, matmul(x, self.weight, self.bias, self.packed, self.weight_scale))

    def forward_normed(self, norm, x: torch.Tensor,
                       residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm`` (an RMSNorm) applied to ``x + residual`` (or ``x``), then this layer.
        Returns ``(output, new residual)``. At batch 1 on CUDA the norm runs inside the GEMV
        (``kernels/gemv.py``: one launch, no normalised copy of the row)."""
        ops = None if self.lora_on() else _gemv_ops(x, self.weight)
        if (ops is not None and ops.gemv_rmsnorm is not None
                and (residual is None or residual.is_contiguous())):
            return ops.gemv_rmsnorm(x, residual, norm.weight, norm.eps, self.weight, self.bias,
                                    w_scale=self.weight_scale)
        if residual is None:
            return self(norm(x)), x
        x, residual = norm(x, residual)
        return self(x), residual


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate_up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def shard_rows(self, shard_id) -> tuple[int, int, int]:
        tp, shard = dist.tp_size(), int(shard_id)
        size = self.out_sizes[shard] // tp
        return sum(self.out_sizes[:shard]) // tp, size, dist.tp_rank() * size


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; kv heads are replicated when tp_size > num_kv_heads."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        tp = dist.tp_size()
        assert num_heads % tp == 0, f"{num_heads} attention heads do not split over tp={tp}"
        self.head_dim = head_dim
        self.q_heads = num_heads // tp
        self.kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        out = (self.q_heads + 2 * self.kv_heads) * head_dim * tp
        super().__init__(hidden, out, bias)

    def shard_rows(self, shard_id) -> tuple[int, int, int]:
        r, d = dist.tp_rank(), self.head_dim
        q, kv = self.q_heads * d, self.kv_heads * d
        if shard_id == "q":
            return 0, q, r * q
        return (q if shard_id == "k" else q + kv), kv, (r // self.kv_replicas) * kv


class RowParallelLinear(PackableWeight):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        tp = dist.tp_size()
        assert in_features % tp == 0, f"{in_features} input features do not split over tp={tp}"
        self.in_per_rank = in_features // tp
        if fp8.building_fp8():
            self.weight, self.weight_scale = fp8.new_params(out_features, self.in_per_rank,
                                                            self.weight_loader, self._scale_loader)
        else:
            self.weight = _param((out_features, self.in_per_rank), self.weight_loader)
            self.register_parameter("weight_scale", None)
        self.bias = _param((out_features,), self._bias_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        r = dist.tp_rank()
        part = loaded.narrow(1, r * self.in_per_rank, self.in_per_rank)
        if self.weight_scale is not None:  # fp8: as stored, or quantized per row of this shard
            fp8.load_rows(param, self.weight_scale, slice(None), part)
        else:
            param.data.copy_(part)

    def _scale_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(fp8.expand_scale(loaded, param.shape[0]))

    def _bias_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(self._with_lora(x, matmul(x, self.weight, None, self.packed,
                                                      self.weight_scale)))

    def forward_silu_mul(self, gate_up: torch.Tensor, act) -> torch.Tensor:
        """This layer applied to ``act(gate_up)`` (``act``: SiluAndMul). At batch 1 on CUDA the
        activation runs inside the GEMV (``kernels/gemv.py``)."""
        ops = None if self.lora_on() else _gemv_ops(gate_up, self.weight)
        if ops is not None and ops.gemv_silu_mul is not None:
            return self._reduce(ops.gemv_silu_mul(gate_up, self.weight, w_scale=self.weight_scale))
        return self(act(gate_up))

    def _reduce(self, y: torch.Tensor) -> torch.Tensor:
        y = dist.all_reduce(y)
        # The bias is added once, after the reduction.
        return y + self.bias if self.bias is not None else y
