"""User-supplied logit processors (SGLang's ``CustomLogitProcessor``).

A processor travels as a string (``Processor.to_str()``) holding its pickled class, so
accepting one means running code the client sent: the engine refuses them unless it was
started with ``enable_custom_logit_processor=True``.
"""

from __future__ import annotations

import functools
import json
import pickle
from abc import ABC, abstractmethod
from typing import Any

import torch

try:  # by-value pickling lets classes defined in scripts and notebooks travel
    import cloudpickle as _pickler
except ImportError:  # pragma: no cover - cloudpickle ships with most torch installs
    _pickler = pickle


class CustomLogitProcessor(ABC):
    """Subclass and implement ``__call__``; send ``YourProcessor.to_str()`` with requests."""

    @abstractmethod
    def __call__(self, logits: torch.Tensor, custom_param_list: list[dict[str, Any]]) -> torch.Tensor:
        """logits [B, V] of the requests using this processor; one params dict per row."""

    @classmethod
    def to_str(cls) -> str:
        if _pickler is not pickle and cls.__module__ not in ("builtins",):
            import sys

            module = sys.modules.get(cls.__module__)
            if module is not None and not cls.__module__.startswith("radixfleet."):
                _pickler.register_pickle_by_value(module)
        return json.dumps({"callable": _pickler.dumps(cls).hex()})


@functools.lru_cache(maxsize=64)
def load_processor(serialized: str) -> CustomLogitProcessor:
    """Rebuild a processor from ``to_str()``; raises ValueError if it is not one."""
    try:
        cls = pickle.loads(bytes.fromhex(json.loads(serialized)["callable"]))
    except Exception as e:  # any failure here is the client's malformed input
        raise ValueError(f"custom_logit_processor could not be loaded: {e}") from None
    if not (isinstance(cls, type) and callable(cls)):
        raise ValueError("custom_logit_processor must serialise a processor class")
    return cls()


def apply_processors(logits: torch.Tensor, reqs: list) -> torch.Tensor:
    """Run each distinct processor once over its rows (no per-request loop over logits)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(reqs):
        if r.custom_logit_processor:
            groups.setdefault(r.custom_logit_processor, []).append(i)
    for serialized, rows in groups.items():
        proc = load_processor(serialized)
        idx = torch.tensor(rows, device=logits.device)
        params = [dict(reqs[i].params.custom_params or {}) for i in rows]
        logits[idx] = proc(logits[idx], params).to(logits.dtype)
    return logits
