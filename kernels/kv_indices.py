"""Flatten each request's slots from ``req_to_token`` into one packed index list (CSR).

FlashInfer's paged wrappers take the KV cache as (indptr, indices) with page size 1: request
b owns ``indices[indptr[b]:indptr[b + 1]]``. This kernel fills ``indices`` on the device, so
planning a step needs only the host copy of the sequence lengths (no device sync).

Shapes (B requests, R table rows, L table columns, N = indptr[B]):
    req_to_token      [R, L] int32 (last dim contiguous)
    req_pool_indices  [B] int64
    kv_indptr         [B + 1] int32 on the device, kv_indptr[0] = 0
    out               [>= N] int32
Grid: (B,); one program copies one request's row prefix in BLOCK chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_indices_kernel(REQ_TO_TOKEN, REQ_IDX, KV_INDPTR, OUT, stride_rt, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    req = tl.load(REQ_IDX + b).to(tl.int64)
    start = tl.load(KV_INDPTR + b).to(tl.int64)
    n = tl.load(KV_INDPTR + b + 1).to(tl.int64) - start
    row = REQ_TO_TOKEN + req * stride_rt
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(OUT + start + offs, tl.load(row + offs, mask=mask, other=0), mask=mask)


def build_kv_indices(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     kv_indptr: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[kv_indptr[b]:kv_indptr[b+1]] = req_to_token[req_pool_indices[b], :len_b]`` → ``out``."""
    assert req_to_token.stride(1) == 1, "req_to_token rows must be contiguous"
    assert kv_indptr.dtype == torch.int32 and out.dtype == torch.int32
    B = req_pool_indices.shape[0]
    assert kv_indptr.shape[0] == B + 1, "kv_indptr must have batch_size + 1 entries"
    if B:
        _kv_indices_kernel[(B,)](req_to_token, req_pool_indices, kv_indptr, out,
                                 req_to_token.stride(0), BLOCK=512, num_warps=4)
    return out
