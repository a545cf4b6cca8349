"""The W8A8 linear method: int8 weights with per-channel scales, int8 activations per token.

Owns: ``W8A8LinearMethod`` (the tensors a W8A8 layer holds, ``weight`` int8
[out, in] and ``weight_scale`` float32 [out, 1], named as compressed-tensors
checkpoints name them, so each rank's loader slices them like any weight) and its
matmul: quantize the activation rows (symmetric, per token, at run time), int8 x
int8 with int32 sums, scales and bias applied on the way out, in the activation
dtype. Where the op before the layer already quantized its output (RMSNorm,
SiLU-and-mul: ``QuantizedActivation``), the int8 rows are used as they come; where it
recorded each row's max instead (``RowMaxActivation``), the backend quantizes inside the
matmul. The backend provides the kernels (``int8_linear_dynamic``, ``int8_linear``, and
``int8_linear_silu`` for a gate_up layer whose SiLU-and-mul it fuses).
Stateless apart from the layer's tensors; LoRA wraps it like the unquantized method.
"""
from __future__ import annotations

import torch
from torch import nn

from pdserve.engine.backends.base import Backend
from pdserve.engine.layers.linear import ParamDims, QuantizedActivation, RowMaxActivation

# Dummy weights: uniform int8 has a standard deviation of ~73.3; this scale gives the
# dequantized weights the 0.02 of unquantized dummy weights.
DUMMY_SCALE = 0.02 / 73.3


class W8A8LinearMethod:
    takes_int8_input = True  # the producer of the input may quantize it in its own pass

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       dtype: torch.dtype) -> dict[str, ParamDims]:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=torch.int8), requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.empty(output_size, 1, dtype=torch.float32), requires_grad=False)
        return {"weight": ParamDims(output_dim=0, input_dim=1, init="int8"),
                "weight_scale": ParamDims(output_dim=0, init=f"const:{DUMMY_SCALE}")}

    def prepare(self, layer: nn.Module, be: Backend) -> None:
        """Once, after loading: the weight in the form ``be``'s int8 matmul reads (packed on CPU)."""
        layer.weight = nn.Parameter(be.prepare_int8_weight(layer.weight.data), requires_grad=False)

    @staticmethod
    def int8_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(the prepared int8 weight, the per-output-column scales) for a fusing backend."""
        return layer.weight, layer.weight_scale

    def apply(self, layer: nn.Module, x: "torch.Tensor | QuantizedActivation | RowMaxActivation", be: Backend,
              bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):
            return be.int8_linear(x.q, x.scale, layer.weight, layer.weight_scale, bias, x.dtype)
        if isinstance(x, RowMaxActivation):
            return be.int8_linear_dynamic(x.x, x.amax, layer.weight, layer.weight_scale, bias)
        y = be.int8_linear_dynamic(x.reshape(-1, x.shape[-1]), None, layer.weight, layer.weight_scale, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def apply_silu_and_mul(self, layer: nn.Module, x: "torch.Tensor | QuantizedActivation",
                           be: Backend) -> RowMaxActivation | None:
        """silu(gate) * up of this (gate;up) layer's output with each row's max |value|, from one
        fused matmul where the backend has it for this batch; else None."""
        if not isinstance(x, QuantizedActivation):
            return None
        fused = be.int8_linear_silu(x.q, x.scale, layer.weight, layer.weight_scale, x.dtype)
        return None if fused is None else RowMaxActivation(*fused)


__all__ = ["DUMMY_SCALE", "W8A8LinearMethod"]
