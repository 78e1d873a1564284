"""Backend name → class; kernel libraries are imported only when their backend is chosen."""

from __future__ import annotations

import importlib

from radixfleet.engine.attention.base import AttentionBackend

ATTENTION_BACKENDS: dict[str, str] = {
    "torch_native": "radixfleet.engine.attention.torch_native:TorchNativeBackend",
    "triton": "radixfleet.engine.attention.triton_backend:TritonAttentionBackend",
    "flashinfer": "radixfleet.engine.attention.flashinfer_backend:FlashInferBackend",
}


def default_backend(device_type: str) -> str:
    return "triton" if device_type == "cuda" else "torch_native"


def get_backend_class(name: str) -> type[AttentionBackend]:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention_backend {name!r}; choose from {', '.join(ATTENTION_BACKENDS)}")
    module, cls = ATTENTION_BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)
