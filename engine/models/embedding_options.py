"""Per-request embedding options read from the model folder: instruction prefixes and
reduced dimensions (Matryoshka).

- Prompts: sentence-transformers' ``config_sentence_transformers.json`` names prefixes
  (``"prompts": {"query": "Instruct: ...\\nQuery: ", ...}``, gte-Qwen2 / e5-mistral style)
  and maybe a ``default_prompt_name``. A text input gets ``prompts[prompt_name]`` (else the
  default's) prepended before tokenisation, as ``SentenceTransformer.encode`` does;
  token-id inputs are taken as given (asking for a prompt with them is an error).
- ``dimensions``: a model whose ``config.json`` says ``"is_matryoshka": true`` (any size
  up to its own) or lists ``"matryoshka_dimensions"`` (those sizes) gives the first
  ``dimensions`` values of its embedding, L2-renormalised when its pooling normalises.
  Any other model accepts only its own size.

The scheduler publishes what the folder says in its ready info (``folder_options``); the
Engine and the HTTP routes apply it to each request (``apply_prompt``, ``check_dimensions``,
``truncate``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def folder_options(folder: str, hf: dict[str, Any]) -> dict[str, Any]:
    """The ready-info entries: ``prompts``, ``default_prompt_name``, ``matryoshka_dimensions``
    (None: not reducible; ``[]``: any size)."""
    prompts: dict[str, str] = {}
    default = None
    path = os.path.join(folder, "config_sentence_transformers.json")
    if os.path.isfile(path):
        with open(path) as f:
            st = json.load(f)
        prompts = {str(k): str(v) for k, v in (st.get("prompts") or {}).items()}
        default = st.get("default_prompt_name")
        if default is not None and default not in prompts:
            raise ValueError(f"{path}: default_prompt_name {default!r} is not one of the prompts "
                             f"{sorted(prompts)}")
    dims = hf.get("matryoshka_dimensions")
    if dims is not None:
        dims = sorted(int(d) for d in dims)
    elif hf.get("is_matryoshka"):
        dims = []
    return {"prompts": prompts, "default_prompt_name": default, "matryoshka_dimensions": dims}


def apply_prompt(info: dict[str, Any], texts: list[str] | None, prompt_name: str | None) -> list[str] | None:
    """``texts`` with the chosen (or default) prompt prepended; ValueError for an unknown name
    or a prompt asked for token-id inputs (``texts`` None)."""
    prompts = info.get("prompts") or {}
    if prompt_name is not None and (not isinstance(prompt_name, str) or prompt_name not in prompts):
        known = ", ".join(sorted(prompts)) or "none"
        raise ValueError(f"prompt_name {prompt_name!r}: this model's prompts are {known}")
    name = prompt_name if prompt_name is not None else info.get("default_prompt_name")
    if name is None:
        return texts
    if texts is None:
        if prompt_name is not None:
            raise ValueError("prompt_name applies to text inputs, not input_ids")
        return None
    return [prompts[name] + t for t in texts]


def check_dimensions(info: dict[str, Any], dimensions: Any) -> int | None:
    """The size to truncate to (None: the model's own); ValueError saying what is allowed."""
    full = info.get("embedding_dim")
    if dimensions is None or dimensions == full:
        return None
    allowed = info.get("matryoshka_dimensions")
    if allowed is None:
        raise ValueError(f"dimensions={dimensions!r}: this model has no reduced-dimension embeddings "
                         f"(it gives {full})")
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 0 < dimensions < full:
        raise ValueError(f"dimensions={dimensions!r}: must be an integer from 1 to {full}")
    if allowed and dimensions not in allowed:
        raise ValueError(f"dimensions={dimensions}: this model's reduced sizes are "
                         f"{', '.join(map(str, allowed))}")
    return dimensions


def truncate(vector: list[float], dimensions: int | None, normalize: bool) -> list[float]:
    """The first ``dimensions`` values, L2-renormalised when the model's pooling normalises."""
    if dimensions is None:
        return vector
    head = vector[:dimensions]
    if not normalize:
        return head
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]
