"""Host → device copies that never wait for the device.

``torch.tensor(values, device="cuda")`` copies from pageable memory, which waits for the
stream; with the overlap schedule that would stall the host behind the step still running.
Through pinned memory with ``non_blocking=True`` the copy is queued on the stream instead.
"""

from __future__ import annotations

import torch


def to_device(values: list | torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """A host list (or CPU tensor) as a tensor of ``dtype`` on ``device``, without a sync."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.as_tensor(values, dtype=dtype, device=device)
    return torch.as_tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
