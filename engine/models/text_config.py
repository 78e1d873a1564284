"""The language model's config of a multimodal checkpoint served as text only.

Gemma 3 4B/12B/27B ship as ``Gemma3ForConditionalGeneration``: the text decoder's settings sit
in ``text_config`` (often only the fields that differ from transformers' defaults), its
weights under ``language_model.`` next to a vision tower. The engine serves the decoder
alone (text prompts; image inputs are not supported): this module turns such a config.json
into the text model's, with transformers' defaults filled in (its config classes hold data
and run no model code) and the checkpoint's own tokens and dtype kept.
"""

from __future__ import annotations

from typing import Any

# Multimodal architecture → the transformers config class of its text model.
TEXT_CONFIGS = {"Gemma3ForConditionalGeneration": "Gemma3TextConfig"}
_KEEP = ("eos_token_id", "bos_token_id", "pad_token_id", "torch_dtype", "dtype", "tie_word_embeddings")


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """``hf`` itself, or for a multimodal architecture the full dict of its text model."""
    archs = hf.get("architectures") or []
    if not archs or archs[0] not in TEXT_CONFIGS:
        return hf
    import transformers

    cls = getattr(transformers, TEXT_CONFIGS[archs[0]], None)
    if cls is None:
        raise ValueError(f"{archs[0]} needs transformers >= 4.50 (installed: {transformers.__version__})")
    text = cls(**(hf.get("text_config") or {})).to_dict()
    text.update({k: hf[k] for k in _KEEP if hf.get(k) is not None})
    text["architectures"] = list(archs)
    return text
