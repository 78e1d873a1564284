"""Batch-1 GEMV for decode: ``x [1, K] @ W[N, K].T (+ bias) → [1, N]``, bf16/fp16, fp32 accumulate,
optionally with the elementwise op that produces ``x`` folded into it.

``W`` may also be fp8 (e4m3) with a per-row scale ``w_scale [N, 1]`` (``engine/layers/fp8.py``):
the kernel reads one byte per weight and multiplies each output by its row's scale, so a
batch-1 decode step streams half the bytes of bf16; ``x`` stays in the model dtype.

At batch 1 a linear layer only streams its weight, so its time is bytes / bandwidth, and each
separate elementwise kernel before it costs a launch and a gap in the CUDA graph that are
about as long as the kernel. Every program reads all of ``x`` (from L2), so the op that makes
``x`` can run inside the GEMV:

- ``gemv``: plain ``x``.
- ``gemv_rmsnorm``: ``x = rmsnorm(h + residual) * norm_weight`` (the decoder layer's input and
  post-attention norms). The sum of squares is accumulated as ``x`` is read and ``1/rms``
  scales each output, so ``x`` is never materialised; the first program writes
  the new residual ``h + residual``. Differs from the separate kernels only in rounding:
  the normalised row is not rounded to the model dtype before the weight multiply.
- ``gemv_silu_mul``: ``x = silu(gate) * up`` from the ``[1, 2K]`` gate_up output (the MLP's
  down projection), rounded as ``kernels/activation.py`` rounds it.

Two kernels, no split-K, one launch each:

- whole rows (K up to ``ROWS_MAX_K``, 16384): each program makes ``x`` once (fp32, in
  registers) and takes whole ``[BLOCK_N, K]`` row blocks ``pid, pid + G, ...``, loading the
  next block's weight while it reduces this one. Grid: ``cdiv(N, BLOCK_N)`` programs, or
  ``G = SMs x PER_SM`` persistent ones. Its configuration is a fixed choice per shape
  (``_rows_config``).
- K loop (larger K): each program owns ``BLOCK_N`` rows and walks K in ``BLOCK_K`` steps,
  keeping a ``[BLOCK_N, BLOCK_K]`` fp32 partial-product tile and re-reading ``x`` chunk by
  chunk. Grid: ``cdiv(N, BLOCK_N)``. Autotuned per (N, K, prologue) on first use (outside
  CUDA-graph capture: the graph runner warms every batch size up first).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from radixfleet import env_vars
from radixfleet.kernels.pdl import gdc_launch_dependents, gdc_wait, prefetch_l2, use_pdl

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (8, 512, 8, 3), (16, 256, 4, 3),
        (16, 256, 8, 4), (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 8, 3), (8, 1024, 8, 2),
        (4, 1024, 4, 2), (16, 128, 4, 6), (8, 512, 4, 4), (16, 512, 4, 4), (32, 512, 8, 2),
    ]
]

# Whole-row kernel configuration: (BLOCK_N, warps, programs per SM; 0 = one program per row
# block). Not autotuned: autotuning picked differently from process to process (timings a few
# percent apart) and the decode step moved by ~0.2 ms with it, so the config is a fixed
# choice (``_rows_config``), from ``benchmarks/kernel_bench.py --only gemv_sweep``.
# "N,K,PROLOGUE" -> [BLOCK_N, warps, per SM] (tuning for other GPUs); see _rows_config.
ROWS_TABLE = env_vars.GEMV_ROWS_TABLE.get()
ROWS_OVERRIDE: tuple[int, int, int] | None = None  # set by tests and the sweep
# The packed fp8 path (``_fp8_dot8``): True or None, wherever it runs (compute capability
# 8.9+); False, never. On an H100 it is faster at every Llama-3.1-8B shape's best block
# (qkv 11.3 vs 14.3 us, o_proj 7.3 vs 9.2, gate_up 40.3 vs 42.5, down 23.2 vs 26.1:
# ``kernel_bench.py --only gemv_fp8_sweep``).
FP8_PACKED: bool | None = None
# Largest power-of-two K the whole-row kernel holds in registers; above it, the K-loop kernel.
ROWS_MAX_K = env_vars.GEMV_ROWS_MAX_K.get()

PLAIN, RMSNORM, SILU_MUL = 0, 1, 2
_PREFETCH_MAX_BYTES = env_vars.GEMV_PREFETCH_MAX_BYTES.get()


@triton.jit
def _x_chunk(X, RES, NORM_W, NEW_RES, K, offs, pid, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """``x`` at columns ``offs`` (fp32) and, for the RMSNorm prologue, the squares of the
    normalised-to-be row there (summed by the caller)."""
    ok = offs < K
    if PROLOGUE == 1:  # x = (h + residual) * norm_weight; 1/rms applied at the end
        s = tl.load(X + offs, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(RES + offs, mask=ok, other=0.0)
            s = (s.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
            if pid == 0:
                tl.store(NEW_RES + offs, s, mask=ok)
        sf = s.to(tl.float32)
        x = sf * tl.load(NORM_W + offs, mask=ok, other=0.0).to(tl.float32)
        sq = sf * sf
    elif PROLOGUE == 2:  # x = silu(gate) * up, gate_up = [gate | up] of width 2K
        gate = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(X + K + offs, mask=ok, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty).to(tl.float32)
        x = (act * up).to(X.dtype.element_ty).to(tl.float32)
        sq = x * 0.0
    else:
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        sq = x * 0.0
    return x, sq


@triton.autotune(configs=_CONFIGS, key=["N", "K", "PROLOGUE"])
@triton.jit
def _gemv_kernel(X, RES, NORM_W, W, W_SCALE, B, OUT, NEW_RES, N, K, stride_w, eps,
                 PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_W_SCALE: tl.constexpr,
                 USE_PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr, LINE_ELEMS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Any K: each program walks K for its BLOCK_N rows, re-reading x chunk by chunk."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_PDL:  # see kernels/pdl.py
        gdc_launch_dependents()
        if PREFETCH_LINES > 0:
            # The weight does not depend on the previous kernel: start pulling this program's
            # rows into L2 while that kernel still runs, then wait for it.
            offs = tl.arange(0, PREFETCH_LINES) * LINE_ELEMS
            offs = tl.where(offs < K, offs, 0)
            first = tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_w
            prefetch_l2(W + first + offs[None, :])
        gdc_wait()
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    w_ptrs = W + rows.to(tl.int64)[:, None] * stride_w + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        x, sq = _x_chunk(X, RES, NORM_W, NEW_RES, K, k + cols, pid, PROLOGUE, HAS_RESIDUAL)
        sum_sq += sq
        w = tl.load(w_ptrs + k, mask=row_ok[:, None] & ((k + cols) < K)[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if PROLOGUE == 1:
        y = y / tl.sqrt(tl.sum(sum_sq, 0) / K + eps)
    if HAS_W_SCALE:
        y *= tl.load(W_SCALE + rows, mask=row_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(OUT + rows, y.to(OUT.dtype.element_ty), mask=row_ok)


def _rows_config(n: int, k: int, prologue: int, fp8: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, warps, programs per SM) for the whole-row kernel. From the sweep on an H200 at
    the Llama-3.1-8B shapes (kernels/NOTES.md): two rows per block, persistent programs, 8
    per SM at K <= 8192 and one at K = 16384 (the row block fills the registers). fp8
    weights: the same blocks (registers hold elements, whatever their width). Table keys for
    fp8 weights end in ",fp8"."""
    if ROWS_OVERRIDE is not None:
        return ROWS_OVERRIDE
    tuned = ROWS_TABLE.get(f"{n},{k},{prologue}" + (",fp8" if fp8 else ""))
    if tuned is not None:
        return tuple(tuned)
    if fp8:  # from an H100 sweep at the Llama-3.1-8B shapes, packed path (kernel_bench.py)
        if triton.next_power_of_2(k) >= 16384:
            return (2, 8, 2)  # down_proj 23.2 us, 2.53 TB/s (2, 16, 1: 27.0 us)
        if prologue == RMSNORM:
            return (4, 4, 0) if n <= 8192 else (4, 4, 8)
        return (4, 4, 4)
    if triton.next_power_of_2(k) >= 16384:
        return (2, 8, 1)
    return (2, 4, 8)


# Eight e4m3 weights (one int64 word) times eight x values (two int64 words of four f16):
# two weights convert to an f16 pair in one instruction, the four products add up as f16
# pairs, and only the two halves convert to fp32. Converting every byte to fp32 instead costs
# about twice the instructions per byte, which bounded the fp8 GEMV below the bandwidth.
# x is scaled to |x| <= 1 first, so a pair sum stays within 4 x 448 (f16's range is 65504).
_FP8_DOT8_ASM = tl.constexpr("""{
.reg .b16 w0, w1, w2, w3; .reg .b32 h0, h1, h2, h3, x0, x1, x2, x3, p; .reg .f16 lo, hi;
.reg .f32 f0, f1;
mov.b64 {w0, w1, w2, w3}, $1;
mov.b64 {x0, x1}, $2;
mov.b64 {x2, x3}, $3;
cvt.rn.f16x2.e4m3x2 h0, w0;
cvt.rn.f16x2.e4m3x2 h1, w1;
cvt.rn.f16x2.e4m3x2 h2, w2;
cvt.rn.f16x2.e4m3x2 h3, w3;
mul.rn.f16x2 p, h0, x0;
fma.rn.f16x2 p, h1, x1, p;
fma.rn.f16x2 p, h2, x2, p;
fma.rn.f16x2 p, h3, x3, p;
mov.b32 {lo, hi}, p;
cvt.f32.f16 f0, lo;
cvt.f32.f16 f1, hi;
add.f32 $0, f0, f1;
}""")


@triton.jit
def _fp8_dot8(w, xa, xb):
    """Per int64 word of ``w`` (8 e4m3): the fp32 dot with the 8 f16 in ``xa`` (4) and ``xb`` (4)."""
    return tl.inline_asm_elementwise(_FP8_DOT8_ASM, "=r,l,l,l", [w, xa, xb], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _pack_x_f16(x, BLOCK_K: tl.constexpr):
    """fp32 ``x`` [BLOCK_K] → (words 0, 2, 4, ... and 1, 3, 5, ... of ``x / amax`` as f16, four
    per int64; ``amax``), laid out to match 8 fp8 weights per int64 word."""
    amax = tl.max(tl.abs(x), 0)
    amax = tl.where(amax > 0, amax, 1.0)
    bits = (x / amax).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF
    shift = tl.arange(0, 4).to(tl.int64) * 16
    words = tl.sum(tl.reshape(bits, [BLOCK_K // 4, 4]) << shift[None, :], axis=1)  # disjoint bits
    xa, xb = tl.split(tl.reshape(words, [BLOCK_K // 8, 2]))
    return xa, xb, amax


@triton.jit
def _gemv_rows_kernel(X, RES, NORM_W, W, W_SCALE, B, OUT, NEW_RES, N, K, stride_w, eps,
                      PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_W_SCALE: tl.constexpr,
                      USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE_ELEMS: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PER_SM: tl.constexpr,
                      FP8_PACKED: tl.constexpr = False):
    """K <= BLOCK_K: each program makes x once (one load of it, the prologue run once), then
    takes whole row blocks ``pid, pid + G, ...`` (G programs), loading the next block's
    weight before reducing this one's. Under PDL the first block's weight is loaded before
    waiting for the previous kernel (the weight does not depend on it), and with ``PREFETCH``
    the program's other blocks are requested into L2 then too.

    ``FP8_PACKED``: ``W`` is the fp8 weight viewed as int64 (8 e4m3 per word, ``stride_w`` in
    words); see ``_fp8_dot8``."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    WORDS: tl.constexpr = BLOCK_K // 8 if FP8_PACKED else BLOCK_K
    wcols = tl.arange(0, WORDS)
    wcol_ok = wcols < (K // 8 if FP8_PACKED else K)
    lane = tl.arange(0, BLOCK_N)
    rows = pid * BLOCK_N + lane
    w = tl.load(W + rows.to(tl.int64)[:, None] * stride_w + wcols[None, :],
                mask=(rows < N)[:, None] & wcol_ok[None, :], other=0.0, eviction_policy="evict_first")
    if USE_PDL:  # see kernels/pdl.py
        gdc_launch_dependents()
        if PREFETCH:
            lines = tl.arange(0, WORDS // LINE_ELEMS) * LINE_ELEMS
            lines = tl.where(lines < (K // 8 if FP8_PACKED else K), lines, 0)
            for block in range(pid + step, n_blocks, step):
                ahead = tl.minimum(block * BLOCK_N + lane, N - 1).to(tl.int64)
                prefetch_l2(W + ahead[:, None] * stride_w + lines[None, :])
        gdc_wait()
    x, sq = _x_chunk(X, RES, NORM_W, NEW_RES, K, cols, pid, PROLOGUE, HAS_RESIDUAL)
    scale = 1.0
    if PROLOGUE == 1:
        scale = 1.0 / tl.sqrt(tl.sum(sq, 0) / K + eps)
    if FP8_PACKED:
        xa, xb, amax = _pack_x_f16(x, BLOCK_K)
        scale = scale * amax
    for block in range(pid, n_blocks, step):
        rows = block * BLOCK_N + lane
        nxt = rows + step * BLOCK_N
        w_next = tl.load(W + nxt.to(tl.int64)[:, None] * stride_w + wcols[None, :],
                         mask=(nxt < N)[:, None] & wcol_ok[None, :], other=0.0,
                         eviction_policy="evict_first")
        if FP8_PACKED:
            y = tl.sum(_fp8_dot8(w, xa[None, :], xb[None, :]), axis=1) * scale
        else:
            y = tl.sum(w.to(tl.float32) * x[None, :], axis=1) * scale
        if HAS_W_SCALE:
            y *= tl.load(W_SCALE + rows, mask=rows < N, other=0.0)
        if HAS_BIAS:
            y += tl.load(B + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(OUT + rows, y.to(OUT.dtype.element_ty), mask=rows < N)
        w = w_next


def _fp8_packed(device: torch.device) -> bool:
    """Whether fp8 weights take the packed f16 path (``_fp8_dot8``: PTX for compute capability
    8.9+, so never under triton's interpreter)."""
    if FP8_PACKED is False:
        return False
    return device.type == "cuda" and _cuda_capability(device.index if device.index is not None
                                                      else torch.cuda.current_device()) >= (8, 9)


@functools.cache
def _cuda_capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # triton's interpreter
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch(x, weight, bias, prologue, k, residual=None, norm_weight=None, new_residual=None,
            eps=0.0, w_scale=None) -> torch.Tensor:
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1, "weight must be [N, K] with contiguous rows"
    is_fp8 = weight.dtype == torch.float8_e4m3fn
    assert is_fp8 == (w_scale is not None), "fp8 weights need w_scale (and only they take one)"
    assert w_scale is None or (w_scale.numel() == n and w_scale.dtype == torch.float32)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    pdl = use_pdl(x)
    block_k = triton.next_power_of_2(k)
    rows = block_k <= ROWS_MAX_K
    packed = (rows and is_fp8 and k % 8 == 0 and weight.stride(0) % 8 == 0
              and weight.storage_offset() % 8 == 0 and _fp8_packed(x.device))
    w = weight.view(torch.int64) if packed else weight  # packed: 8 e4m3 per word
    args = (x, residual if residual is not None else x, norm_weight if norm_weight is not None else x,
            w, w_scale if w_scale is not None else x, bias if bias is not None else x, out,
            new_residual if new_residual is not None else x, n, k, w.stride(0), eps)
    flags = dict(PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
                 HAS_W_SCALE=is_fp8, USE_PDL=pdl, launch_pdl=pdl)
    line_elems = 128 // w.element_size()  # of w per 128-byte line
    # Prefetch only weights that fit in L2 beside everything else (H100/H200: 50 MB).
    prefetch = pdl and weight.numel() * weight.element_size() <= _PREFETCH_MAX_BYTES
    if rows:
        block_n, warps, per_sm = _rows_config(n, k, prologue, is_fp8)
        programs = blocks = triton.cdiv(n, block_n)
        if per_sm:  # as many programs as fit, then fewer so that each takes as many blocks
            programs = triton.cdiv(blocks, triton.cdiv(blocks, min(blocks, _sm_count(x.device) * per_sm)))
        _gemv_rows_kernel[(programs,)](
            *args, PREFETCH=prefetch, LINE_ELEMS=line_elems,
            BLOCK_K=max(block_k, 128 // weight.element_size()),  # at least one line of weights
            BLOCK_N=block_n, PER_SM=per_sm, FP8_PACKED=packed, num_warps=warps, **flags)
        return out
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        *args, PREFETCH_LINES=triton.next_power_of_2(triton.cdiv(k, line_elems)) if prefetch else 0,
        LINE_ELEMS=line_elems, **flags)
    return out


def _check_row(x: torch.Tensor, name: str = "x") -> None:
    assert x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous(), f"{name} must be one contiguous row"


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [1, K] contiguous, ``weight`` [N, K] with contiguous rows (fp8 with ``w_scale``
    [N, 1] fp32) → [1, N] in x's dtype."""
    _check_row(x)
    return _launch(x, weight, bias, PLAIN, x.shape[1], w_scale=w_scale)


def gemv_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                 eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 w_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (or ``x``) → ``(rmsnorm(s) * norm_weight @ weight.T + bias, s)``."""
    _check_row(x)
    if residual is not None:
        _check_row(residual, "residual")
        assert residual.shape == x.shape
    assert norm_weight.shape == (x.shape[1],) and norm_weight.is_contiguous()
    new_residual = torch.empty_like(x) if residual is not None else x
    out = _launch(x, weight, bias, RMSNORM, x.shape[1], residual, norm_weight,
                  new_residual if residual is not None else None, eps, w_scale)
    return out, new_residual


def gemv_silu_mul(gate_up: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None, *,
                  w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``gate_up`` [1, 2K] → ``(silu(gate) * up) @ weight.T + bias`` [1, N]."""
    _check_row(gate_up, "gate_up")
    assert gate_up.shape[1] % 2 == 0
    return _launch(gate_up, weight, bias, SILU_MUL, gate_up.shape[1] // 2, w_scale=w_scale)
