"""The KV cache's storage: per-layer K and V buffers indexed by token slot."""

from __future__ import annotations

import torch


class KVPool:
    """Per-layer K and V buffers, ``[num_slots, num_kv_heads, head_dim]`` each.

    On CPU, a layer's K and V are interleaved in one ``[num_slots, 2, num_kv_heads, head_dim]``
    tensor (``kv_buffers``; ``k_buffers``/``v_buffers`` are strided views of it), so the
    torch_native decode gathers a request's keys and values in one ``index_select``.
    Elsewhere ``kv_buffers`` is None and K and V are separate contiguous tensors.
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, interleave: bool | None = None):
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

    def store(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffers[layer_id].index_copy_(0, loc, k.to(self.k_buffers[layer_id].dtype))
        self.v_buffers[layer_id].index_copy_(0, loc, v.to(self.v_buffers[layer_id].dtype))

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
