"""Activations: a Triton kernel for the gated SiLU of Llama-style MLPs.

Owns: ``silu_and_mul``. Stateless. Numerics follow ``reference.silu_and_mul_ref``,
computed in float32 and rounded once to the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, 2I] holds the gate in x[:, :I] and the up projection in x[:, I:]; returns silu(gate) * up [T, I]."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"expected x [T, 2I], got {tuple(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    rows, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    elif out.shape != (rows, inter) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be {(rows, inter)} {x.dtype} with a contiguous last dim")
    if rows == 0 or inter == 0:
        return out
    block = min(triton.next_power_of_2(inter), 1024)
    _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), INTER=inter, BLOCK=block,
        num_warps=max(1, min(4, block // 256)),
    )
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out,
                         INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
