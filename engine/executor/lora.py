"""LoRA adapters (peft format) served next to the base weights, any mix per batch.

Each adapter is loaded once and stays resident: for every targeted projection of every
layer, ``A`` [r, in] and ``B`` [out, r] with the peft scaling (``lora_alpha / r``, or
``/ sqrt(r)`` with rslora) folded into ``B``. Projections the engine fuses take fused
adapters: q/k/v → ``qkv_proj`` (A stacked [3r, in], B block-diagonal), gate/up →
``gate_up_proj``. A step's requests name their adapter (index 0: none); before the
forward, ``LoRAManager.prepare`` groups the step's tokens by adapter, and each linear layer
adds ``(x[rows] @ A.T) @ B.T`` for the groups present. A step without adapter requests
costs nothing extra and keeps every fused kernel and CUDA graph; a step with some runs
eagerly, with the layers' norm and activation unfused.

Requests on an adapter neither read nor feed the radix cache (their KV differs from the
base model's). Tensor parallelism is not supported with adapters (``EngineConfig`` refuses it).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from torch import nn

from radixfleet.engine.memory.transfer import to_device

# peft module name -> (our fused module, shard index within it)
_TARGETS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "o_proj": ("o_proj", 0), "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
            "down_proj": ("down_proj", 0)}


@dataclass
class LoRABatch:
    """This step's token groups: (adapter index, token rows on the device)."""

    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class LoRAState:
    """Shared by every layer: the adapters' weights per layer, and the step being run."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None

    @property
    def active(self) -> bool:
        return self.batch is not None


def lora_delta(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` [T, out] plus each token group's adapter update computed from ``x`` [T, in]."""
    state: LoRAState | None = getattr(layer, "lora_state", None)
    if state is None or state.batch is None:
        return y
    for index, rows in state.batch.groups:  # y is this step's fresh matmul output
        weights = layer.lora_weights.get(index)
        if weights is not None:
            a, b = weights
            y.index_add_(0, rows, (x[rows] @ a.T) @ b.T)
    return y


@dataclass
class Adapter:
    name: str
    path: str
    index: int
    rank: int
    targets: tuple[str, ...]


def parse_lora_paths(entries: tuple[str, ...] | None) -> dict[str, str]:
    """``name=path`` or ``path`` (named by itself) → {name: path}."""
    out: dict[str, str] = {}
    for entry in entries or ():
        name, sep, path = entry.partition("=")
        if not sep:
            name, path = entry, entry
        if not name or not path:
            raise ValueError(f"lora_paths entry {entry!r} must be 'name=path' or a path")
        if name in out:
            raise ValueError(f"LoRA adapter name {name!r} is given twice")
        out[name] = path
    return out


class LoRAManager:
    """Loads adapters into the model's linear layers and prepares each step's groups."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self.state = LoRAState()
        self.adapters: dict[str, Adapter] = {}
        self._free = itertools.count(1)
        self.layers: dict[tuple[int, str], nn.Module] = {}
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            # A mixture-of-experts block has no gate_up/down projection of its own: only its
            # attention takes adapters.
            for name, module in (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj),
                                 ("gate_up_proj", getattr(mlp, "gate_up_proj", None)),
                                 ("down_proj", getattr(mlp, "down_proj", None))):
                if module is None:
                    continue
                module.lora_state = self.state
                module.lora_weights = {}
                self.layers[(i, name)] = module

    # ---- adapters ----------------------------------------------------------------------
    def load(self, name: str, path: str) -> Adapter:
        if not isinstance(name, str) or not name or not isinstance(path, str):
            raise ValueError("a LoRA adapter needs a name and a path (strings)")
        if name in self.adapters:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
        config, tensors = _read_peft(path)
        targets_cfg = config.get("target_modules") or []
        odd = sorted({t.rsplit(".", 1)[-1] for t in targets_cfg} - set(_TARGETS)) if isinstance(
            targets_cfg, list) else []
        if odd:
            raise ValueError(f"{path}: LoRA on {', '.join(odd)} is not supported; targets may be "
                             f"{', '.join(_TARGETS)}")
        rank = int(config["r"])
        scale = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
        parts: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        targets: set[str] = set()
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            prefix = key.split(".lora_A.")[0]
            b = tensors.get(f"{prefix}.lora_B.weight")
            if b is None:
                raise ValueError(f"{path}: {prefix} has lora_A but no lora_B")
            layer_id, module = _layer_and_module(prefix, path)
            fused, shard = _TARGETS[module]
            if not 0 <= layer_id < len(self.model.layers):
                raise ValueError(f"{path}: layer {layer_id} does not exist in the base model")
            if (layer_id, fused) not in self.layers:
                raise ValueError(f"{path}: LoRA on {module} of layer {layer_id} is not supported "
                                 "(a mixture-of-experts MLP takes no adapters; attention does)")
            parts.setdefault((layer_id, fused), {})[shard] = (a, b * scale)
            targets.add(module)
        if not parts:
            raise ValueError(f"{path}: no lora_A / lora_B weights found")
        index = next(self._free)
        for key, shards in parts.items():
            self.layers[key].lora_weights[index] = self._fuse(self.layers[key], shards, path, key)
        adapter = Adapter(name, path, index, rank, tuple(sorted(targets)))
        self.adapters[name] = adapter
        return adapter

    def _fuse(self, layer: nn.Module, shards: dict[int, tuple[torch.Tensor, torch.Tensor]],
              path: str, key: tuple[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One (A [R, in], B [out, R]) for a possibly fused projection: absent shards get no rows."""
        out_sizes = _out_sizes(layer)
        in_features = layer.weight.shape[1]
        a_parts, b_blocks = [], []
        for shard, out in enumerate(out_sizes):
            if shard not in shards:
                continue
            a, b = shards[shard]
            if a.shape[1] != in_features or b.shape[0] != out or b.shape[1] != a.shape[0]:
                raise ValueError(f"{path}: layer {key[0]} {key[1]} shard {shard}: A {tuple(a.shape)} / "
                                 f"B {tuple(b.shape)} do not fit a [{out}, {in_features}] projection")
            a_parts.append(a)
            block = torch.zeros(sum(out_sizes), b.shape[1], dtype=b.dtype)
            start = sum(out_sizes[:shard])
            block[start:start + out] = b
            b_blocks.append(block)
        a_all = torch.cat(a_parts).to(self.device, self.dtype)
        b_all = torch.cat(b_blocks, dim=1).to(self.device, self.dtype)
        return a_all, b_all

    def unload(self, name: str) -> None:
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded")
        for layer in self.layers.values():
            layer.lora_weights.pop(adapter.index, None)

    def index_of(self, name: str | None) -> int:
        if name is None:
            return 0
        adapter = self.adapters.get(name)
        if adapter is None:
            loaded = ", ".join(sorted(self.adapters)) or "none"
            raise ValueError(f"unknown LoRA adapter {name!r}; loaded: {loaded}")
        return adapter.index

    # ---- steps -------------------------------------------------------------------------
    def prepare(self, adapter_ids: list[int] | None, extend_lens: list[int]) -> None:
        """Group this step's tokens by adapter (requests with ``extend_lens[i]`` new tokens each)."""
        if not adapter_ids or not any(adapter_ids):
            self.state.batch = None
            return
        rows: dict[int, list[int]] = {}
        start = 0
        for index, n in zip(adapter_ids, extend_lens, strict=True):
            if index:
                rows.setdefault(index, []).extend(range(start, start + n))
            start += n
        self.state.batch = LoRABatch([(i, to_device(r, torch.int64, self.device)) for i, r in rows.items()])

    def finish(self) -> None:
        self.state.batch = None


_NO_LORA = (False, "this engine was started without enable_lora")


def load_adapter(lora: LoRAManager | None, name: str, path: str) -> tuple[bool, str]:
    """The scheduler's ``load_lora_adapter`` call → (success, message)."""
    if lora is None:
        return _NO_LORA
    try:
        adapter = lora.load(name, path)
    except ValueError as e:
        return False, str(e)
    return True, f"loaded LoRA adapter {name!r} (rank {adapter.rank}, {', '.join(adapter.targets)})"


def unload_adapter(lora: LoRAManager | None, name: str, users: list) -> tuple[bool, str]:
    """The scheduler's ``unload_lora_adapter`` call → (success, message). ``users``: every
    request not finished yet; an adapter one of them names is not unloaded."""
    if lora is None:
        return _NO_LORA
    try:
        index = lora.index_of(name)
        in_use = sum(r.lora_id == index for r in users)
        if in_use:
            return False, f"LoRA adapter {name!r} is in use by {in_use} request(s)"
        lora.unload(name)
    except ValueError as e:
        return False, str(e)
    return True, f"unloaded LoRA adapter {name!r}"


def _out_sizes(layer: nn.Module) -> list[int]:
    """Output rows of each fused shard of ``layer`` (this rank's)."""
    if hasattr(layer, "q_heads"):  # QKVParallelLinear
        d = layer.head_dim
        return [layer.q_heads * d, layer.kv_heads * d, layer.kv_heads * d]
    if hasattr(layer, "out_sizes"):  # MergedColumnParallelLinear
        return list(layer.out_sizes)
    return [layer.weight.shape[0]]


def _layer_and_module(prefix: str, path: str) -> tuple[int, str]:
    """``base_model.model.model.layers.3.self_attn.q_proj`` → (3, "q_proj")."""
    parts = prefix.split(".")
    try:
        at = parts.index("layers")
        layer_id, module = int(parts[at + 1]), parts[-1]
    except (ValueError, IndexError):
        raise ValueError(f"{path}: LoRA weights for {prefix!r}: only decoder-layer projections are "
                         f"supported ({', '.join(_TARGETS)})") from None
    if module not in _TARGETS:
        raise ValueError(f"{path}: LoRA on {module!r} is not supported; targets may be {', '.join(_TARGETS)}")
    return layer_id, module


def _read_peft(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
        raise ValueError(f"{path!r} is not a peft LoRA folder (adapter_config.json + "
                         "adapter_model.safetensors)")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("target_parameters"):  # peft >= 0.22 writes these for fused experts (gate_up_proj)
        raise ValueError(f"{path}: LoRA on parameters ({', '.join(map(str, config['target_parameters']))}) is not "
                         "supported: a mixture-of-experts MLP takes no adapters; attention does")
    unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ValueError(f"{path}: unsupported adapter settings: "
                         f"{', '.join(unsupported) or config.get('peft_type')}")
    return config, {k: v.float() for k, v in load_file(weights_path).items()}
