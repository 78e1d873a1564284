"""Engine configuration: one frozen dataclass; ``Engine(**kwargs)`` and the CLI flags both
come from its fields. Unknown names are an error, never silently dropped."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

SCHEDULE_POLICIES = ("lpm", "fcfs")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(ValueError, TypeError):
    """A bad engine argument (a ``ValueError``; also a ``TypeError`` for unknown names)."""


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class EngineConfig:
    model_path: str = field(metadata={"help": "HF-format model folder, 'smollm2' for the default model, or a "
                                              "Hugging Face Hub repo id (org/name) to download"})
    tokenizer_path: str | None = _opt(None, "tokenizer folder or Hub repo id (default: model_path)")
    revision: str | None = _opt(None, "branch, tag or commit of a Hub model_path (default: main)")
    download_dir: str | None = _opt(None, "Hub cache folder for Hub models (default: $HF_HUB_CACHE, else "
                                          "$HF_HOME/hub)")
    trust_remote_code: bool = _opt(False, "allow model code from the model folder (off: only built-in architectures)")
    context_length: int | None = _opt(None, "maximum context length (default: from the model config)")
    dtype: str = _opt("auto", "weight and activation dtype (auto: the model's on GPU; on CPU bfloat16 where "
                                      "the CPU has native bf16, AVX512_BF16 or AMX, else float32)", DTYPES)
    device: str = _opt("auto", "cpu, cuda, or auto")
    quantization: str | None = _opt(None, "fp8: quantize linear weights to fp8 e4m3 at load (CUDA, compute "
                                          "capability 8.9+); FP8 checkpoints are detected without it",
                                    ("fp8",))
    kv_cache_dtype: str = _opt("auto", "KV-cache storage: auto (the model dtype) or fp8_e4m3 (half the "
                                       "bytes per token; CUDA, triton or flashinfer attention)",
                               KV_CACHE_DTYPES)
    load_format: str = _opt("auto", "auto (safetensors) or dummy (random weights from the config)", ("auto", "safetensors", "dummy"))
    mem_fraction_static: float | None = _opt(None, "fraction of device memory for weights + KV cache")
    max_total_tokens: int | None = _opt(None, "KV-cache size in tokens (default: derived from memory)")
    max_running_requests: int | None = _opt(None, "most requests decoding at once")
    max_prefill_tokens: int = _opt(16384, "most new tokens in one prefill batch")
    chunked_prefill_size: int | None = _opt(None, "split prefills longer than this (-1: never split)")
    page_size: int = _opt(1, "tokens per KV-cache page")
    schedule_policy: str = _opt("lpm", "waiting-queue order: lpm (longest prefix match) or fcfs", SCHEDULE_POLICIES)
    schedule_conservativeness: float = _opt(1.0, "higher reserves more KV for future decode tokens")
    disable_radix_cache: bool = _opt(False, "never reuse cached prefixes")
    random_seed: int | None = _opt(None, "seed for sampling (default: random)")
    log_level: str = _opt("error", "logging level", LOG_LEVELS)
    tp_size: int = _opt(1, "tensor-parallel size (GPUs per replica)")
    dist_init_addr: str | None = _opt(None, "host:port of rank 0 for multi-node tensor parallelism")
    nnodes: int = _opt(1, "nodes in one tensor-parallel group")
    node_rank: int = _opt(0, "this node's rank in the group")
    attention_backend: str | None = _opt(None, "torch_native, triton or flashinfer (default per device)")
    disable_cuda_graph: bool = _opt(False, "run decode without CUDA graphs")
    cuda_graph_max_bs: int | None = _opt(None, "largest decode batch captured in a CUDA graph")
    disable_overlap_schedule: bool | None = _opt(
        None, "build each batch only after the previous step's tokens reach the host (default: "
              "overlap scheduling with the device's work on CUDA with tp_size 1, not elsewhere; "
              "Engine(disable_overlap_schedule=False) overlaps on any device)")
    served_model_name: str | None = _opt(None, "model name reported by the API (default: model_path)")
    enable_custom_logit_processor: bool = _opt(False, "accept custom logit processors (deserialises code)")
    stream_interval: int = _opt(1, "send streamed tokens every N steps")
    skip_tokenizer_init: bool = _opt(False, "take and return token ids only")
    enable_lora: bool = _opt(False, "serve LoRA adapters next to the base weights (set by lora_paths)")
    lora_paths: tuple[str, ...] | None = _opt(None, "LoRA adapters (peft folders) to load at start: "
                                                    "name=path or path")
    allow_auto_truncate: bool = _opt(False, "cut prompts longer than the context (keeping their start) and "
                                            "max_new_tokens to what fits, instead of refusing them")
    allowed_local_paths: tuple[str, ...] | None = _opt(
        None, "folders that update_weights_from_disk and load_lora_adapter may read, besides the "
              "model's folder, its adapters/ folder and lora_paths (anything else is refused)")
    is_embedding: bool = _opt(False, "serve an embedding model (encode only); BERT-family and "
                                     "decoder-only base models (MistralModel, Qwen2Model) always are, "
                                     "generation architectures with this flag (gte-Qwen2)")
    kv_events_port: int = _opt(0, "publish the radix cache's block changes over ZMQ PUB on this port "
                                  "(0: off; radixfleet/kv_events.py)")
    kv_events_host: str = _opt("127.0.0.1", "address the KV-event publisher binds")
    kv_events_block_size: int = _opt(16, "tokens per KV-event block (the unit of the published hashes)")

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(msg)

        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices and not (value is None and f.default is None):
                raise bad(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        if not self.model_path:
            raise bad("model_path is required")
        if self.kv_cache_dtype != "auto" and (self.device == "cpu" or self.attention_backend == "torch_native"):
            raise bad(f"kv_cache_dtype={self.kv_cache_dtype!r} needs CUDA and the triton or flashinfer "
                      "attention backend; use kv_cache_dtype='auto' on CPU or with torch_native")
        if self.quantization == "fp8" and self.device == "cpu":
            raise bad("quantization='fp8' needs a CUDA GPU with fp8 matmuls (compute capability 8.9+); "
                      "on CPU serve the model unquantized (an FP8 checkpoint loads without it)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise bad(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise bad(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        for name in ("context_length", "max_total_tokens", "max_running_requests", "cuda_graph_max_bs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise bad(f"{name} must be a positive integer, got {value}")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size != -1 and self.chunked_prefill_size < 1:
            raise bad(f"chunked_prefill_size must be positive or -1, got {self.chunked_prefill_size}")
        if not 0 <= self.kv_events_port < 65536:
            raise bad(f"kv_events_port must be in 0..65535 (0: off), got {self.kv_events_port}")
        for name in ("page_size", "tp_size", "nnodes", "stream_interval", "max_prefill_tokens", "kv_events_block_size"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.node_rank < self.nnodes:
            raise bad(f"node_rank must be in [0, nnodes), got {self.node_rank} with nnodes={self.nnodes}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise bad("nnodes > 1 needs dist_init_addr (host:port of rank 0)")
        if self.tp_size % self.nnodes:
            raise bad(f"tp_size ({self.tp_size}) must be a multiple of nnodes ({self.nnodes}): "
                      "every node runs tp_size // nnodes ranks")
        if self.dist_init_addr and (":" not in self.dist_init_addr
                                    or not self.dist_init_addr.rpartition(":")[2].isdigit()):
            raise bad(f"dist_init_addr must be host:port, got {self.dist_init_addr!r}")
        if self.allowed_local_paths is not None:
            object.__setattr__(self, "allowed_local_paths", tuple(self.allowed_local_paths))
        if self.lora_paths:
            object.__setattr__(self, "lora_paths", tuple(self.lora_paths))
            object.__setattr__(self, "enable_lora", True)
        if self.enable_lora and self.tp_size > 1:
            raise bad("LoRA adapters run with tp_size 1 only (enable_lora / lora_paths with tp_size "
                      f"{self.tp_size})")
        if self.tp_size > 1 and self.device.startswith("cuda:"):
            raise bad(f"device={self.device!r} names one GPU, but tp_size={self.tp_size} needs one per "
                      "rank: use device='cuda' (rank i takes cuda:i; pick GPUs with CUDA_VISIBLE_DEVICES)")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown engine argument(s): {', '.join(unknown)}")
        if "model_path" not in kwargs:
            raise ConfigError("model_path is required")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    @property
    def log_level_int(self) -> int:
        return getattr(logging, self.log_level.upper())

    # ---- CLI -------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        hints = get_type_hints(cls)
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            help_ = f.metadata.get("help", "")
            if hint is bool or hint == bool | None:  # the flag sets True; absent, the default (None: auto)
                parser.add_argument(flag, action="store_true", default=f.default, help=help_)
                continue
            if "tuple" in str(hint):  # one or more values
                parser.add_argument(flag, nargs="+", default=f.default, help=help_)
                continue
            kind = int if "int" in str(hint) else float if "float" in str(hint) else str
            required = f.default is dataclasses.MISSING
            parser.add_argument(flag, type=kind, required=required,
                                default=None if required else f.default,
                                choices=f.metadata.get("choices"), help=help_)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
