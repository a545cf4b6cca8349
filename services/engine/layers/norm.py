"""RMSNorm as a layer: its weight (replicated on every rank) and the backend's fused op.

Owns: the weight and epsilon. ``forward`` optionally adds a residual first and
returns ``(normed, new residual)``, as ``Backend.rms_norm`` does; with ``quantize``
the normed rows come out quantized per token in the same pass (a ``QuantizedActivation``
for an int8 layer that reads them).
"""
from __future__ import annotations

import torch
from torch import nn

from pdserve.engine.backends.base import Backend
from pdserve.engine.layers.context import LayerContext
from pdserve.engine.layers.linear import QuantizedActivation
from pdserve.engine.layers.loading import Shard, WeightSpec, read


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ctx: LayerContext):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=ctx.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, be: Backend, residual: torch.Tensor | None = None,
                quantize: bool = False) -> tuple["torch.Tensor | QuantizedActivation", torch.Tensor]:
        if quantize:
            q, scale, residual = be.rms_norm_quant(x, self.weight, self.eps, residual)
            return QuantizedActivation(q, scale, x.dtype), residual
        return be.rms_norm(x, self.weight, self.eps, residual)

    def weight_specs(self) -> tuple[WeightSpec, ...]:
        return (WeightSpec("weight", None, tuple(self.weight.shape), init="ones"),)

    def load_weight(self, param: str, tensor: torch.Tensor, shard: Shard = None) -> None:
        if param != "weight" or shard is not None:
            raise ValueError(f"RMSNorm has no tensor {param!r} (part {shard!r})")
        if tuple(tensor.shape) != tuple(self.weight.shape):
            raise ValueError(f"shape {tuple(tensor.shape)}, expected {tuple(self.weight.shape)}")
        self.weight.data.copy_(read(tensor))


__all__ = ["RMSNorm"]
