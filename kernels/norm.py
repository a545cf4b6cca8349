"""RMSNorm: a Triton kernel for RMSNorm fused with the residual add.

Owns: ``rms_norm``. Stateless. Numerics follow ``reference.rms_norm_ref`` (as HF
Llama): the residual add rounds to the activation dtype, the normalisation runs
in float32 and rounds back to the activation dtype before the weight multiply.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, *,
             out: torch.Tensor | None = None,
             residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [T, H] (after adding residual, if given).

    Args:
        x: [T, H] activations; residual: optional [T, H] added to x first.
        weight: [H]. eps: variance epsilon.
        out, residual_out: optional output buffers (``residual_out`` may alias
            ``residual`` for an in-place update).

    Returns:
        (normed, new_residual): new_residual is x + residual (x itself when no
        residual is given), the value the next residual add must use.
    """
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"expected x [T, H] and weight [H], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    x = _rows_contiguous(x)
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out_dtype = torch.promote_types(weight.dtype, res_dtype)
    out = _buffer(out, x.shape, out_dtype, x.device, "out")
    if residual is None:
        new_residual = x
    else:
        residual = _rows_contiguous(residual)
        new_residual = _buffer(residual_out, x.shape, res_dtype, x.device, "residual_out")
    rows, hidden = x.shape
    if rows == 0:
        return out, new_residual
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows,)](
        x, residual if residual is not None else x, new_residual, weight.contiguous(), out, eps,
        x.stride(0), new_residual.stride(0), out.stride(0),
        0 if residual is None else residual.stride(0),
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=max(1, min(16, block // 512)),
    )
    return out, new_residual


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _buffer(buf: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype,
            device: torch.device, name: str) -> torch.Tensor:
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if buf.shape != shape or buf.dtype != dtype or buf.stride(1) != 1:
        raise ValueError(f"{name} must be {tuple(shape)} {dtype} with a contiguous last dim")
    return buf


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr, eps,
    stride_x, stride_res_out, stride_out, stride_res,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res_ty = res_out_ptr.dtype.element_ty
        x = x + tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(res_ty)
        tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
        x = x.to(tl.float32)
    else:
        res_ty = x_ptr.dtype.element_ty
    var = tl.sum(x * x, 0) / HIDDEN
    h = (x * tl.rsqrt(var + eps)).to(res_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (w * h).to(out_ptr.dtype.element_ty), mask=mask)
