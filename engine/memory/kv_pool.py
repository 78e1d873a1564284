"""The KV cache's storage: per-layer K and V buffers indexed by token slot."""

from __future__ import annotations

import torch


class KVPool:
    """Per-layer K and V buffers, ``[num_slots, num_kv_heads, head_dim]`` each.

    On CPU, a layer's K and V are interleaved in one ``[num_slots, 2, num_kv_heads, head_dim]``
    tensor (``kv_buffers``; ``k_buffers``/``v_buffers`` are strided views of it), so the
    torch_native decode gathers a request's keys and values in one ``index_select``.
    Elsewhere ``kv_buffers`` is None and K and V are separate contiguous tensors.

    An fp8 pool (``kv_cache_dtype="fp8_e4m3"``, CUDA) stores ``k / k_scales[layer]`` and
    ``v / v_scales[layer]`` in ``float8_e4m3fn``: half the bytes of bf16 per token, so twice
    the tokens in the same memory. The scales are 1.0 unless the checkpoint has calibrated
    ones (``self_attn.k_scale`` / ``v_scale``).
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, interleave: bool | None = None,
                 model_dtype: torch.dtype | None = None):
        """``dtype``: what the buffers store; ``model_dtype``: the k/v handed to ``store`` and
        the queries read against them (default ``dtype``; differs for an fp8 pool)."""
        shape = (num_slots, num_kv_heads, head_dim)
        if interleave is None:
            interleave = torch.device(device).type == "cpu"
        self.kv_buffers: list[torch.Tensor] | None = None
        if interleave:
            self.kv_buffers = [torch.zeros((num_slots, 2, num_kv_heads, head_dim), dtype=dtype, device=device)
                               for _ in range(num_layers)]
            self.k_buffers = [kv[:, 0] for kv in self.kv_buffers]
            self.v_buffers = [kv[:, 1] for kv in self.kv_buffers]
        else:
            self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.dtype = dtype
        self.model_dtype = model_dtype or dtype
        self.k_scales = [1.0] * num_layers
        self.v_scales = [1.0] * num_layers

    @property
    def is_fp8(self) -> bool:
        return self.dtype == torch.float8_e4m3fn

    def set_scales(self, k_scales: dict[int, float], v_scales: dict[int, float]) -> None:
        """Calibrated per-layer scales (checkpoint ``k_scale`` / ``v_scale``); fp8 pools only."""
        for layer, scale in k_scales.items():
            self.k_scales[layer] = float(scale)
        for layer, scale in v_scales.items():
            self.v_scales[layer] = float(scale)

    def _encode(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        if self.is_fp8:
            return (x.float() / scale).clamp(-448.0, 448.0).to(self.dtype)
        return x.to(self.dtype)

    def store(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffers[layer_id].index_copy_(0, loc, self._encode(k, self.k_scales[layer_id]))
        self.v_buffers[layer_id].index_copy_(0, loc, self._encode(v, self.v_scales[layer_id]))

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
