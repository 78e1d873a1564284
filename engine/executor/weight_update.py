"""Replacing a running engine's weights from a folder (SGLang's ``update_weights_from_disk``),
and reading them back (``get_weights_by_name``).

The new folder must hold the same architecture and shapes (``incompatibility`` says why not,
before anything is touched). Tensors are copied into the existing parameters, so CUDA graphs
captured on them stay valid; CPU layers re-pack their oneDNN copies. If loading fails
part-way (a missing or misnamed tensor), the previous folder's weights are loaded back. The
scheduler runs an update only with no request running, and flushes the radix cache after
it (cached KV was computed by the old weights); with tensor parallelism every rank loads its
own shards of the same folder.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from radixfleet.engine.models.model_config import ModelConfig

if TYPE_CHECKING:
    from radixfleet.engine.executor.model_runner import ModelRunner

# What must match for the new tensors to fit the running model.
_SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings", "attention_bias")
# Mixture of experts: config.json fields that shape the expert tensors.
_MOE_FIELDS = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
               "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers")


def incompatibility(current: ModelConfig, path: str) -> str | None:
    """Why the folder ``path`` cannot replace the running weights; None when it can."""
    if not os.path.isdir(path):
        return f"model_path {path!r} is not a folder"
    try:
        new = ModelConfig.from_path(path)
    except (ValueError, KeyError, OSError) as e:
        return f"cannot read {path!r}: {e}"
    fields = [(n, getattr(new, n), getattr(current, n)) for n in _SHAPE_FIELDS]
    fields += [(n, new.hf.get(n), current.hf.get(n)) for n in _MOE_FIELDS]
    for name, theirs, ours in fields:
        if theirs != ours:
            return (f"{path!r} has {name}={theirs!r}, the running model {ours!r}: only weights of the "
                    "same shape can be swapped in")
    return None


def _quantization_mismatch(runner: ModelRunner, path: str) -> str | None:
    """Why ``path``'s weight format cannot go into the running layers. fp8 layers take bf16
    (quantized as they load) and FP8 folders; plain layers take only plain folders (an FP8
    folder's weights would arrive without their scales)."""
    from radixfleet.engine.models.quant_config import resolve_quantization

    try:
        spec = resolve_quantization(None, ModelConfig.from_path(path).hf)
    except ValueError as e:
        return str(e)
    if spec is not None and spec.prequantized and not runner.fp8_compute:
        return (f"{path!r} is an FP8 checkpoint, which this engine dequantized at start (no fp8 "
                "matmuls here): restart the engine on the new folder instead")
    return None


def update_from_disk(runner: ModelRunner, path: str, previous: str | None) -> tuple[bool, str]:
    """Load ``path`` into ``runner``; on failure restore ``previous`` (None: random weights,
    which cannot be restored). Returns (success, message)."""
    reason = incompatibility(runner.model_config, path)
    if reason is None:
        reason = _quantization_mismatch(runner, path)
    if reason is not None:
        return False, reason
    try:
        runner.load_weights(path)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        if previous is None:
            return False, f"loading {path!r} failed ({e}); the weights are now partly updated"
        runner.load_weights(previous)
        return False, f"loading {path!r} failed ({e}); the previous weights were restored"
    return True, f"weights updated from {path!r}"


def weights_by_name(model: torch.nn.Module, name: str, truncate_size: int = 100) -> list[float]:
    """The first ``truncate_size`` values of parameter ``name`` (this rank's shard, flattened)."""
    params = dict(model.named_parameters())
    key = name.removeprefix("model.")
    if key not in params:
        raise ValueError(f"no parameter {name!r}; e.g. {', '.join(sorted(params)[:4])}")
    return params[key].detach().flatten()[:truncate_size].float().cpu().tolist()
