"""Programmatic dependent launch (PDL, Hopper and later) for the decode-step kernels.

A batch-1 decode step is ~200 short kernels in a CUDA graph; between two dependent kernels
the GPU drains the first, then launches and ramps up the second, about a microsecond each
time. Launched with PDL, a kernel's programs are placed on the SMs while the kernel before
it is still running: each kernel lets its dependents launch as soon as its own programs have
all started (``gdc_launch_dependents``), and waits for the previous kernel to finish and its
writes to be visible (``gdc_wait``) before it reads or writes any tensor. Both calls sit under
a ``USE_PDL`` constexpr, and every kernel launched with ``launch_pdl`` must make them before
touching memory: that is what keeps the chain correct. The one exception is model weights,
which no kernel of a step writes: the GEMVs load or prefetch them before waiting.

``RADIXFLEET_PDL=0`` turns it off; it is off before compute capability 9.0 and under
triton's interpreter.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from radixfleet import env_vars

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older triton: PDL off
    gdc_launch_dependents = gdc_wait = None


@functools.cache
def _enabled(device_index: int) -> bool:
    if gdc_wait is None or not env_vars.PDL.get():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(x: torch.Tensor) -> bool:
    """Whether kernels working on ``x`` launch with PDL."""
    if not x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _enabled(x.device.index if x.device.index is not None else torch.cuda.current_device())


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 to fetch the 128-byte lines at ``ptrs`` (no registers, nothing waits for it)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def pdl_start(USE_PDL: tl.constexpr):
    """First statement of a PDL-launched kernel: let the next kernel launch, then wait for
    the previous one (nothing may be read or written before this)."""
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
