"""Per-layer attention settings read from an HF ``config.json``: sliding windows, the
softmax scale and attention-logit soft-capping, with transformers' semantics per family.

Sliding window ``W`` (transformers' ``sliding_window_overlay``): a query at position ``p``
attends to keys at positions ``p - W + 1 .. p`` (``kv > q - W``), i.e. ``W`` keys counting
itself. Which layers slide:

- a config with ``layer_types`` (transformers >= 4.53 writes it for Qwen2/3, Gemma 2/3):
  the ``"sliding_attention"`` layers;
- Qwen2/Qwen3 (and their MoE) without it: layers ``>= max_window_layers`` when
  ``use_sliding_window`` is true, none otherwise;
- Gemma 2 without it: every other layer starting with the first; Gemma 3: all but every
  ``sliding_window_pattern``-th (default 6);
- everything else (Mistral, Mixtral, Phi-3): every layer when ``sliding_window`` is set.
"""

from __future__ import annotations

from typing import Any

_QWEN_TYPES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


def layer_types(hf: dict[str, Any], num_layers: int) -> list[str]:
    """``"sliding_attention"`` or ``"full_attention"`` per layer, as transformers decides."""
    window = hf.get("sliding_window")
    model_type = hf.get("model_type", "")
    if hf.get("layer_types") and model_type not in ("mistral", "mixtral", "phi3"):
        types = list(hf["layer_types"])
        if len(types) != num_layers:
            raise ValueError(f"config.json lists {len(types)} layer_types for {num_layers} layers")
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"unsupported layer_types {sorted(unknown)} (supported: "
                             "sliding_attention, full_attention)")
        if window is None or (model_type in _QWEN_TYPES and not hf.get("use_sliding_window", False)):
            return ["full_attention"] * num_layers
        return types
    if model_type in _QWEN_TYPES:
        sliding = bool(hf.get("use_sliding_window", False)) and window is not None
        first = hf.get("max_window_layers", num_layers)
        return ["sliding_attention" if sliding and i >= first else "full_attention"
                for i in range(num_layers)]
    if model_type == "gemma2":
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if model_type in ("gemma3", "gemma3_text"):
        pattern = hf.get("sliding_window_pattern") or 6
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    return ["sliding_attention" if window is not None else "full_attention"] * num_layers


def sliding_windows(hf: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """The window of each layer (None: full attention)."""
    window = hf.get("sliding_window")
    types = layer_types(hf, num_layers)
    # Qwen2-MoE's config writes sliding_window 0 when use_sliding_window is off: check only used windows.
    if "sliding_attention" in types and (not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window must be a positive integer, not {window!r}")
    return tuple(window if t == "sliding_attention" else None for t in types)


def attention_scale(hf: dict[str, Any], head_dim: int) -> float:
    """The softmax scale: ``query_pre_attn_scalar ** -0.5`` (Gemma), else ``head_dim ** -0.5``."""
    scalar = hf.get("query_pre_attn_scalar")
    return float(scalar) ** -0.5 if scalar else head_dim ** -0.5


def attention_logit_cap(hf: dict[str, Any]) -> float | None:
    """Gemma 2's ``attn_logit_softcapping`` (``cap * tanh(s / cap)`` on the scaled logits).
    Gemma 3's configs carry the field too, but transformers' Gemma 3 never applies it."""
    if hf.get("model_type") != "gemma2":
        return None
    cap = hf.get("attn_logit_softcapping")
    return float(cap) if cap else None
