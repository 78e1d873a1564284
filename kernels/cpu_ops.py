"""CPU kernels for the decode path (fp32 and bf16): ``cpu_ops.c`` compiled once per machine,
called by ctypes.

At a decode step's sizes (tens of rows) the CPU time of RMSNorm, rotary, SiLU-mul and the
gather + SDPA of decode attention is mostly per-op overhead and memory traffic, not
arithmetic; one C call each replaces 3–10 torch ops, and decode attention reads K/V straight
from the pool instead of gathering a copy first. ``benchmarks/offline_throughput.py`` shows
the effect (with ``RADIXFLEET_CPU_KERNELS=0`` for the torch-only path).

Built with the system C compiler (``cc``/``gcc``, ``-O3 -march=native -fopenmp``) into
``$XDG_CACHE_HOME/radixfleet/kernels/`` on first use, keyed by the source hash and the CPU,
so every engine process on the machine reuses one build. Without a compiler, or with
``RADIXFLEET_CPU_KERNELS=0``, ``load()`` returns None and layers keep their torch code.
Each kernel has an fp32 and a bf16 entry point (bf16 storage, fp32 arithmetic), picked by
the dtype of the tensors; each has a torch reference in ``tests/unit/test_cpu_ops.py``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from radixfleet import env_vars

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_ops.c")
_i64, _i32, _f32, _p = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "rf_decode_attention": [_p, _p, _p, _i64, _p, _p, _p, _p, _i64, _i32, _i32, _i32, _i32, _f32],
    "rf_rmsnorm": [_p, _p, _p, _p, _p, _i32, _i32, _i64, _f32],
    "rf_rotary": [_p, _p, _p, _p, _i32, _i32, _i32, _i32, _i64, _i64, _i64, _i64],
    "rf_silu_and_mul": [_p, _p, _i32, _i32],
}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "radixfleet" / "kernels"


def _cpu_id() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def _build(target: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    base = [cc, "-O3", "-fopenmp", "-fPIC", "-shared", "-std=gnu99", str(_SOURCE), "-lm"]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = os.path.join(tmp, target.name)
        # -march=native where the compiler knows it (x86, recent aarch64 gcc); portable -O3 else.
        for extra in (["-march=native"], []):
            done = subprocess.run(base[:1] + extra + base[1:] + ["-o", out], capture_output=True, text=True)
            if done.returncode == 0:
                break
        else:
            raise OSError(f"compiling {_SOURCE.name} failed: {done.stderr.strip()[-500:]}")
        os.replace(out, target)  # atomic: concurrent builders each install a complete file


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be had (the torch path is used then)."""
    if not env_vars.CPU_KERNELS.get():
        return None
    digest = hashlib.sha256(_SOURCE.read_bytes() + _cpu_id().encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_ops-{digest}.so"
    try:
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        logger.warning("CPU kernels unavailable, using torch ops: %s", e)
        return None
    for name, args in _SIGNATURES.items():
        for suffix in _SUFFIX.values():
            fn = getattr(lib, name + suffix)
            fn.argtypes, fn.restype = args, None
    return lib


_SUFFIX = {torch.float32: "", torch.bfloat16: "_bf16"}


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels apply to ``x``'s device and dtype (fp32, bf16) and are built."""
    return x.device.type == "cpu" and x.dtype in _SUFFIX and load() is not None


def _kernel(name: str, dtype: torch.dtype):
    """The compiled ``name`` for tensors of ``dtype``."""
    return getattr(load(), name + _SUFFIX[dtype])


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# The layer-facing kernels below have the signatures of their triton twins in this package
# (rmsnorm.py, rotary.py, activation.py), so ``engine/layers/fused.py`` hands layers either set.

def _rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
    t, n = x.shape
    assert x.stride(-1) == 1 and weight.is_contiguous() and weight.dtype == x.dtype
    out = torch.empty((t, n), dtype=x.dtype)
    res_out = None
    if residual is not None:
        residual = residual.contiguous()
        assert residual.dtype == x.dtype
        res_out = torch.empty((t, n), dtype=x.dtype)
    _kernel("rf_rmsnorm", x.dtype)(_ptr(x), _ptr(residual), _ptr(weight), _ptr(out), _ptr(res_out), t, n, x.stride(0), eps)
    return out, res_out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x`` [T, N] (row stride free, last dim contiguous) → norm(x) * weight, a new tensor."""
    return _rmsnorm(x, weight, eps, None)[0]


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` → ``(norm(s) * weight, s)``, both new tensors."""
    return _rmsnorm(x, weight, eps, residual)


def apply_rotary_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """In place, neox layout. q [T, H, D], k [T, KVH, D] with a contiguous last dim (token and
    head strides free, as views of one fused QKV output are); cos_sin [P, D] fp32 (the whole
    head is rotated); positions [T] int64."""
    t, h, d = q.shape
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin.shape[1] == d and cos_sin.is_contiguous()
    assert k.dtype == q.dtype and cos_sin.dtype == torch.float32
    positions = positions.contiguous()
    _kernel("rf_rotary", q.dtype)(_ptr(positions), _ptr(q), _ptr(k), _ptr(cos_sin), t, h, k.shape[1], d,
                     q.stride(0), q.stride(1), k.stride(0), k.stride(1))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    t, two_i = x.shape
    x = x.contiguous()
    out = torch.empty((t, two_i // 2), dtype=x.dtype)
    _kernel("rf_silu_and_mul", x.dtype)(_ptr(x), _ptr(out), t, two_i // 2)
    return out


def decode_attention(q: torch.Tensor, kv: torch.Tensor, table: torch.Tensor, rows: torch.Tensor,
                     lens: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    """q [B, H, D]; kv [S, 2, KVH, D] one pool layer, q's dtype; table [R, L] int32; rows [B]
    int64; lens [B] int32 (every entry ≤ ``max_len``) → out [B, H, D]."""
    b, h, d = q.shape
    kvh = kv.shape[2]
    assert kv.is_contiguous() and table.stride(1) == 1 and h % kvh == 0 and h <= 256 and h * d <= 16384
    assert kv.dtype == q.dtype
    q = q.contiguous()
    out = torch.empty_like(q)
    scratch = torch.empty(b * h * max(max_len, 1), dtype=torch.float32)
    _kernel("rf_decode_attention", q.dtype)(_ptr(q), _ptr(kv), _ptr(table), table.stride(0), _ptr(rows), _ptr(lens),
                               _ptr(out), _ptr(scratch), max(max_len, 1), b, h, kvh, d, scale)
    return out
