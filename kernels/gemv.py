"""GEMV: one activation row times a weight matrix, for batch-1 decode steps.

Owns: ``gemv(x, weight)`` = ``x @ weight.T`` for x [1, K] and an ``nn.Linear``
weight [N, K] (row-major), float32 accumulation, output in x's dtype. Stateless.

Why: a batch-1 decode step only streams weights; cuBLAS picks split-K kernels
for some of these shapes (e.g. Llama-3-8B's down projection, 4096 x 14336, read
at ~70% of copy bandwidth plus a separate reduction kernel). Here each program
owns ``BLOCK_N`` output rows and walks all of K, so there is no reduction pass
and every SM streams contiguous rows of the weight. Measured on an H100 against
cuBLAS for Llama-3-8B's projections at M = 1 (``python3 -m pdserve.bench.gemv``): 54.9-101%
of copy bandwidth where cuBLAS reached 48-92%; the defaults are the best of that sweep.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def gemv(x: torch.Tensor, weight: torch.Tensor, *, block_n: int = 16, block_k: int = 1024,
         num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T -> [1, N] in x.dtype."""
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"expected x [1, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("x and weight need a contiguous last dim")
    n, k = weight.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, n, k, weight.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return out


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_wn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + cols) < K
        xv = tl.load(x_ptr + k0 + cols, mask=k_ok, other=0.0).to(tl.float32)
        wv = tl.load(w_rows + k0 + cols[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc += wv.to(tl.float32) * xv[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)
