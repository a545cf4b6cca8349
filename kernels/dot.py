"""How the Triton GEMM kernels call ``tl.dot`` for a given operand dtype and device.

Owns: ``dot_args`` only (the operand dtype and input precision a kernel's ``tl.dot``
takes), shared by the fused MoE and the LoRA kernels. Stateless.
"""
from __future__ import annotations

import torch
import triton.language as tl


def dot_args(x: torch.Tensor) -> dict:
    """Operand dtype and precision of ``tl.dot``: float32 must not be rounded to tf32.

    NOTE: Triton's CPU interpreter multiplies bfloat16 operands as raw integers, so
    off-GPU they are widened to float32 first (exact: bf16 products fit in fp32).
    """
    if x.dtype == torch.bfloat16 and x.device.type != "cuda":
        return dict(DOT_DTYPE=tl.float32, PRECISION="ieee")
    dot_dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[x.dtype]
    return dict(DOT_DTYPE=dot_dtype, PRECISION="ieee" if x.dtype == torch.float32 else "tf32")


__all__ = ["dot_args"]
