"""ModelRunner: owns the weights, the KV cache and the attention backend of one TP rank,
and turns a ``ForwardBatch`` into next-token logits. The scheduler never touches tensors
beyond token ids and slot indices it hands over."""

from __future__ import annotations

import contextlib
import glob
import logging
import os

import psutil
import torch
from safetensors import safe_open

from radixfleet.engine.attention.registry import default_backend, get_backend_class
from radixfleet.engine.config import ConfigError, EngineConfig
from radixfleet.engine.executor.cpu_dtype import default_cpu_dtype
from radixfleet.engine.executor.forward_batch import ForwardBatch, ForwardMode
from radixfleet.engine.executor.quantization import (
    randomize,
    resolve_kv_cache_dtype,
    resolve_weight_quantization,
    split_checkpoint,
)
from radixfleet.engine.layers import distributed as dist
from radixfleet.engine.layers import fp8
from radixfleet.engine.layers.linear import prepack_cpu_weights
from radixfleet.engine.memory.allocator import TokenSlotAllocator
from radixfleet.engine.memory.kv_pool import KVPool
from radixfleet.engine.memory.req_table import ReqToTokenTable
from radixfleet.engine.models.model_config import ModelConfig
from radixfleet.engine.models.registry import get_model_class
from radixfleet.kernels import cpu_ops

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU defaults: the KV pool is sized from RAM, capped so several workers fit on a laptop.
_CPU_MEM_FRACTION = 0.1
_CPU_MAX_KV_TOKENS = 1 << 16
_CPU_MAX_RUNNING = 64


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        check_cuda_device(name)
    return torch.device(name)


def check_cuda_device(name: str) -> None:
    """``ConfigError`` saying why and what to do, unless ``name`` (cuda, cuda:N) is a usable GPU."""
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU-only build"
        else:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU: no NVIDIA driver, "
                   "or no GPU visible to this process"
                   + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""))
        raise ConfigError(f"device={name!r} needs a CUDA GPU, but {why}. Run on a machine with an NVIDIA "
                          "GPU and driver (in Kubernetes: a pod that requests nvidia.com/gpu), or use "
                          "device 'cpu' (--device cpu)")
    index = torch.device(name).index
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r}, but {torch.cuda.device_count()} GPU(s) are visible")


def resolve_dtype(name: str, model: ModelConfig, device: torch.device,
                  cpu_default: torch.dtype = torch.float32) -> torch.dtype:
    """``cpu_default``: what ``auto`` means on CPU (generation models: ``default_cpu_dtype()``)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return cpu_default
    return _DTYPES.get(str(model.torch_dtype), torch.bfloat16) if model.torch_dtype != "float32" else torch.bfloat16


def iter_safetensors(model_path: str):
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_path!r}")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def build_model(cls: type[torch.nn.Module], model_config: ModelConfig, device: torch.device,
                dtype: torch.dtype, fp8_weights: bool = False) -> torch.nn.Module:
    """``cls(model_config)`` with its parameters created in ``dtype`` on ``device`` (the linear
    layers' weights in fp8 with ``fp8_weights``: ``layers/fp8.py``)."""
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), fp8.fp8_weights() if fp8_weights else contextlib.nullcontext():
            return cls(model_config)
    finally:
        torch.set_default_dtype(torch.float32)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str, local_rank: int = 0):
        """``local_rank``: this TP rank's index on its node; it picks the GPU ``cuda:local_rank``
        unless ``config.device`` names one (tp_size 1 only)."""
        self.config = config
        self.model_config = ModelConfig.from_path(model_path)
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device.index if self.device.index is not None else local_rank)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device, default_cpu_dtype())
        self.context_len = config.context_length or self.model_config.max_position_embeddings
        self.backend_name = config.attention_backend or default_backend(self.device.type)
        self.kv_dtype = resolve_kv_cache_dtype(config, self.device, self.backend_name, self.dtype)
        self.quant, self.fp8_compute = resolve_weight_quantization(config, self.model_config, self.device)
        self.kv_scales: dict[str, dict[int, float]] = {}
        self.model = self._load_model(model_path)
        self.lora = None
        if config.enable_lora:
            from radixfleet.engine.executor.lora import LoRAManager, parse_lora_paths

            self.lora = LoRAManager(self.model, self.device, self.dtype)
            for name, path in parse_lora_paths(config.lora_paths).items():
                self.lora.load(name, path)
        self._init_memory()
        backend_name = self.backend_name
        cfg = self.model_config
        self.attn_backend = get_backend_class(backend_name)(
            self.kv_pool, self.model.layers[0].self_attn.num_heads,
            self.model.layers[0].self_attn.num_kv_heads, cfg.head_dim, cfg.attn_scale)
        # A window covering the whole context is full attention.
        windows = tuple(w if w is not None and w < self.context_len else None for w in cfg.sliding_windows)
        try:
            self.attn_backend.configure(windows, cfg.attn_logit_cap)
        except ValueError as e:
            raise ConfigError(f"{cfg.architecture}: {e}") from None
        self.cuda_graphs = None
        if self.device.type == "cuda" and not config.disable_cuda_graph and backend_name != "torch_native":
            from radixfleet.engine.executor.cuda_graph import CudaGraphRunner

            max_bs = min(config.cuda_graph_max_bs or 256, self.max_running_requests)
            self.cuda_graphs = CudaGraphRunner(self.model, self.attn_backend, self.req_table.table,
                                               max_bs, self.device)

    # ---- loading ---------------------------------------------------------------------
    def _load_model(self, model_path: str) -> torch.nn.Module:
        model = build_model(get_model_class(self.model_config.architecture), self.model_config,
                            self.device, self.dtype, fp8_weights=self.quant is not None)
        if self.config.load_format == "dummy":
            randomize(model)
            self._prepack(model)
        else:
            self.load_weights(model_path, model)
        if self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16):
            # Build (first use on this machine) and load now rather than in the first request.
            lib = cpu_ops.load()
            logger.info("CPU decode kernels: %s", "kernels/cpu_ops.c" if lib else "torch ops (fallback)")
        return model.eval()

    def load_weights(self, path: str, model: torch.nn.Module | None = None) -> None:
        """Copy the safetensors of folder ``path`` into the model's parameters (in place)."""
        model = model if model is not None else self.model
        model.load_weights(split_checkpoint(iter_safetensors(path), self.kv_scales))
        if self.quant is not None:
            fp8.check_loaded(model)
            if not self.fp8_compute:
                fp8.dequantize_model_(model, self.dtype)
        self._prepack(model)

    def _prepack(self, model: torch.nn.Module) -> None:
        if self.device.type == "cpu":
            logger.info("prepacked %d linear weights for oneDNN", prepack_cpu_weights(model))

    def update_weights(self, path: str, previous: str | None) -> tuple[bool, str]:
        """Load the same-shaped weights of folder ``path`` in place (``engine/executor/weight_update.py``)."""
        from radixfleet.engine.executor.weight_update import update_from_disk

        return update_from_disk(self, path, previous)

    def _init_memory(self) -> None:
        cfg = self.model_config
        attn = self.model.layers[0].self_attn
        per_token = KVPool.bytes_per_token(cfg.num_layers, attn.num_kv_heads, cfg.head_dim, self.kv_dtype)
        if self.config.max_total_tokens:
            num_tokens = self.config.max_total_tokens
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            fraction = self.config.mem_fraction_static or 0.85
            budget = free - total * (1 - fraction)
            num_tokens = max(int(budget // per_token), 4096)
        else:
            fraction = self.config.mem_fraction_static or _CPU_MEM_FRACTION
            budget = psutil.virtual_memory().available * fraction
            num_tokens = int(min(budget // per_token, _CPU_MAX_KV_TOKENS))
        # Rank 0 hands out slot indices for every rank: all pools must be the same size.
        num_tokens = dist.min_over_ranks(num_tokens)
        page = self.config.page_size
        self.max_total_tokens = num_tokens - num_tokens % page
        # One extra page: page 0 is the padding page, never allocated.
        self.kv_pool = KVPool(cfg.num_layers, self.max_total_tokens + page, attn.num_kv_heads,
                              cfg.head_dim, self.kv_dtype, self.device, model_dtype=self.dtype)
        if self.kv_pool.is_fp8:
            self.kv_pool.set_scales(self.kv_scales.get("k", {}), self.kv_scales.get("v", {}))
        elif self.kv_scales:
            logger.info("the checkpoint's KV-cache scales are unused: the KV cache is %s", self.kv_dtype)
        logger.info("KV cache: %d tokens in %s (%d bytes per token)", self.max_total_tokens,
                    str(self.kv_dtype).removeprefix("torch."), per_token)
        self.allocator = TokenSlotAllocator(self.max_total_tokens + page, page)
        default_running = _CPU_MAX_RUNNING if self.device.type == "cpu" else 256
        self.max_running_requests = self.config.max_running_requests or default_running
        self.req_table = ReqToTokenTable(self.max_running_requests + 1, self.context_len + 1, self.device)

    # ---- forward -----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, sample_last_only: bool = True) -> torch.Tensor:
        """Run the model; return hidden states of the last new token per request [B, hidden]
        (or of every new token [T, hidden] when ``sample_last_only`` is false)."""
        batch.attn_backend = self.attn_backend
        self.req_table.flush()
        if self.cuda_graphs is not None and batch.lora_ids is None and self.cuda_graphs.can_run(batch):
            return self.cuda_graphs.replay(batch)
        self.attn_backend.plan(batch)
        if self.lora is not None:
            self.lora.prepare(batch.lora_ids, batch.extend_seq_lens_cpu)
        try:
            hidden = self.model(batch)
        finally:
            if self.lora is not None:
                self.lora.finish()
        if batch.mode is ForwardMode.EXTEND and sample_last_only:
            hidden = batch.last_tokens(hidden)
        return hidden

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)
