"""Every ``RADIXFLEET_*`` environment variable: name, type, default and meaning, in one place.

Code reads a variable through its entry here (``env_vars.PDL.get()``), never through
``os.environ``; the README's table lists the same entries (``tests/unit/test_env_vars.py``
checks). Standard library only: the kernels, the router and the operator import it without
torch.

Unset or empty means the default. Booleans take ``1/true/yes/on`` or ``0/false/no/off``; a
value that does not parse is a ``ValueError`` naming the variable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _parse_bool(raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")


_PARSERS = {"bool": _parse_bool, "int": int, "float": float, "str": str, "json": json.loads}


@dataclass(frozen=True)
class EnvVar:
    """One variable; ``kind`` is bool, int, float, str or json."""

    name: str
    kind: str
    default: Any
    help: str

    def __post_init__(self) -> None:
        assert self.name.startswith("RADIXFLEET_"), f"{self.name}: not a RADIXFLEET_ variable"
        assert self.kind in _PARSERS, f"{self.name}: unknown kind {self.kind!r}"

    def get(self) -> Any:
        """The value in this process's environment now, parsed; the default when unset."""
        raw = os.environ.get(self.name, "")
        if raw == "":
            return self.default
        try:
            return _PARSERS[self.kind](raw)
        except ValueError as e:
            raise ValueError(f"{self.name}={raw!r}: {e} ({self.help})") from None


REGISTRY: dict[str, EnvVar] = {}


def _var(name: str, kind: str, default: Any, help: str) -> EnvVar:
    assert name not in REGISTRY, f"{name} registered twice"
    REGISTRY[name] = var = EnvVar(name, kind, default, help)
    return var


# ---- serving -------------------------------------------------------------------------------
API_KEY = _var("RADIXFLEET_API_KEY", "str", None,
               "bearer key `radixfleet serve` requires when `--api-key` is not given; the operator "
               "sets it from `apiKeySecret` for engines and the router")
NODE_RANK = _var("RADIXFLEET_NODE_RANK", "int", 0,
                 "set by the operator on multi-node engine pods: the pod's rank, passed as "
                 "`--node-rank` (only rank 0 serves HTTP)")
CACHE = _var("RADIXFLEET_CACHE", "str", None,
             "folder for converted models (unset: `$XDG_CACHE_HOME/radixfleet`, else "
             "`~/.cache/radixfleet`)")
START_TIMEOUT = _var("RADIXFLEET_START_TIMEOUT", "float", 600.0,
                     "seconds an `Engine` waits for its scheduler and detokenizer to start")
GRAMMAR_COMPILE_TIMEOUT = _var("RADIXFLEET_GRAMMAR_COMPILE_TIMEOUT", "float", 30.0,
                               "seconds a request's json_schema, regex or ebnf may take to compile; "
                               "past it the request alone fails with a 400")

# ---- CPU -----------------------------------------------------------------------------------
CPU_KERNELS = _var("RADIXFLEET_CPU_KERNELS", "bool", True,
                   "the C decode kernels (`kernels/cpu_ops.c`) on CPU; off: plain torch ops")
CPU_PREPACK = _var("RADIXFLEET_CPU_PREPACK", "bool", True,
                   "oneDNN-prepacked linear weights on CPU; off: `F.linear`")
CPU_DTYPE = _var("RADIXFLEET_CPU_DTYPE", "str", "auto",
                 "what `dtype=auto` means for generation models on CPU: `auto` (bfloat16 where the CPU "
                 "has native bf16, AVX512_BF16 or AMX; float32 elsewhere), `float32` or `bfloat16`")
CPU_SPIN = _var("RADIXFLEET_CPU_SPIN", "str", "auto",
                "how an engine's OpenMP threads wait between ops on CPU: `auto` (the default): they "
                "spin (`GOMP_SPINCOUNT=1000000`) and a running engine lowers its thread count to the "
                "cores other processes leave free (spinning threads sharing cores with other work are "
                "many times slower); a number: that spin count, same guard; `0`: sleep at once "
                "(`OMP_WAIT_POLICY=PASSIVE`, all threads always). Unused when `OMP_WAIT_POLICY` or "
                "`GOMP_SPINCOUNT` is set")

# ---- GPU kernels ---------------------------------------------------------------------------
DISABLE_FUSED_KERNELS = _var("RADIXFLEET_DISABLE_FUSED_KERNELS", "bool", False,
                             "plain torch ops instead of the fused triton and C kernels")
GEMV = _var("RADIXFLEET_GEMV", "bool", True,
            "batch-1 projections as triton GEMVs (`kernels/gemv.py`); off: cuBLAS")
GEMV_FUSE = _var("RADIXFLEET_GEMV_FUSE", "bool", True,
                 "RMSNorm and SiLU-mul folded into the GEMV that follows them")
GEMV_MAX_ELEMENTS = _var("RADIXFLEET_GEMV_MAX_ELEMENTS", "int", 128 << 20,
                         "largest weight (elements) a batch-1 GEMV takes; larger ones stay on "
                         "cuBLAS")
GEMV_ROWS_MAX_K = _var("RADIXFLEET_GEMV_ROWS_MAX_K", "int", 16384,
                       "largest (power-of-two) K the whole-row GEMV kernel holds in registers; "
                       "above it the K-loop kernel runs")
GEMV_ROWS_TABLE = _var("RADIXFLEET_GEMV_ROWS_TABLE", "json", {},
                       'whole-row GEMV configuration per shape, JSON like '
                       '`{"4096,4096,0": [2, 4, 8]}` ("N,K,prologue": [BLOCK_N, warps, programs '
                       'per SM])')
GEMV_PREFETCH_MAX_BYTES = _var("RADIXFLEET_GEMV_PREFETCH_MAX_BYTES", "int", 40 << 20,
                               "largest weight (bytes) a GEMV prefetches into L2 before PDL's wait")
PDL = _var("RADIXFLEET_PDL", "bool", True,
           "programmatic dependent launch for the decode kernels (Hopper and later)")
MOE_CONFIGS = _var("RADIXFLEET_MOE_CONFIGS", "json", {},
                   'fused MoE GEMM block sizes per expert shape, JSON like `{"128,1536,2048": '
                   '[[32, [16, 64, 128, 1, 4, 4]], [1e18, [64, 128, 64, 8, 8, 3]]]}` ("E,N,K": '
                   '[[max tokens, [BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages]], ...]; '
                   '`benchmarks/moe_kernel.py --tune` prints one)')
FUSE_QK_NORM_ROTARY = _var("RADIXFLEET_FUSE_QK_NORM_ROTARY", "bool", False,
                           "Qwen3's per-head q/k RMSNorms inside the rotary + KV-store kernel "
                           "(`kernels/rotary.py`, one launch per layer less); off until "
                           "checked and measured on a GPU")
MOE_ONE_TOKEN_GEMV = _var("RADIXFLEET_MOE_ONE_TOKEN_GEMV", "bool", True,
                          "batch-1 decode of mixture-of-experts layers as two GEMVs "
                          "(`kernels/moe_gemv.py`); off: the one-token grouped GEMM of "
                          "`kernels/fused_moe.py`")
MOE_TORCH = _var("RADIXFLEET_MOE_TORCH", "bool", False,
                 "mixture-of-experts layers loop over their experts in torch on CUDA too "
                 "(the reference for `kernels/fused_moe.py`; needs `--disable-cuda-graph` to be fast)")

# ---- benchmarks and tests ------------------------------------------------------------------
BENCH_CACHE = _var("RADIXFLEET_BENCH_CACHE", "str", None,
                   "where `benchmarks/router.py` installs sglang-router (unset: "
                   "`~/.cache/radixfleet/bench`)")
ENGINE_E2E = _var("RADIXFLEET_ENGINE_E2E", "bool", False,
                  "run `tests/integration/test_router_engines_e2e.py` (the router over real engines)")
E2E_IMAGE = _var("RADIXFLEET_E2E_IMAGE", "str", "ghcr.io/radixfleet/radixfleet:0.1.0",
                 "image `tests/e2e` deploys")
E2E_TIMEOUT = _var("RADIXFLEET_E2E_TIMEOUT", "float", 900.0,
                   "seconds each wait of `tests/e2e` may take")
