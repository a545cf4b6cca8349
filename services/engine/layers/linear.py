"""Linear layers that know how they are split across tensor-parallel ranks.

Owns: ``LinearBase`` and its split kinds, and the ``LinearMethod`` interface that
creates a layer's weight tensors and performs its matmul. ``UnquantizedLinearMethod``
is the plain one (``Backend.linear``); quantized methods and LoRA wrappers plug in
here with their own tensors (scales, adapter slots) without the models changing.

Split kinds (vocabulary of vLLM and LMDeploy):
- ``ReplicatedLinear``: every rank holds the whole weight.
- ``ColumnParallelLinear``: output features split; each rank computes its slice.
- ``MergedColumnParallelLinear``: several column-parallel outputs stored as one
  (gate;up), each part split on its own.
- ``QKVParallelLinear``: q;k;v by heads; KV heads are replicated when there are
  fewer than ranks.
- ``RowParallelLinear``: input features split; partial sums all-reduced.

Each parameter records which of its dimensions is the output and which the input
(``ParamDims``), so ``load_weight`` can slice any tensor a method creates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import nn

from pdserve.engine.backends.base import Backend, LinearLoRA
from pdserve.engine.layers.context import LayerContext, divide
from pdserve.engine.layers.loading import Shard, WeightSpec, read


@dataclass(frozen=True)
class ParamDims:
    """Which dimension of a parameter holds output features and which input features (None: neither),
    and how dummy weights fill it (``WeightSpec.init``)."""
    output_dim: int | None = None
    input_dim: int | None = None
    init: str = "normal"


class QuantizedActivation(NamedTuple):
    """Activation rows already quantized per token by the op that produced them (RMSNorm,
    SiLU-and-mul), for a layer whose method ``takes_int8_input``: q int8 [T, K], scale
    float32 [T, 1], and the dtype the layer's output should have."""
    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


class RowMaxActivation(NamedTuple):
    """Float activation rows whose per-row max |x| the producing op already recorded (the
    gate_up matmul with SiLU-and-mul fused in), for a layer whose method ``takes_int8_input``:
    it quantizes them per token inside its own matmul. x [T, K], amax float32 [T]."""
    x: torch.Tensor
    amax: torch.Tensor


class LinearMethod(Protocol):
    """How a linear layer stores its weight and multiplies by it."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       dtype: torch.dtype) -> dict[str, ParamDims]:
        """Register this rank's weight tensors on ``layer``; returns their dims by name."""

    def apply(self, layer: nn.Module, x: torch.Tensor, be: Backend, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` with this rank's weights."""


class UnquantizedLinearMethod:
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       dtype: torch.dtype) -> dict[str, ParamDims]:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)
        return {"weight": ParamDims(output_dim=0, input_dim=1)}

    def prepare(self, layer: nn.Module, be: Backend) -> None:
        """Once, after loading: the weight in the form ``be.linear`` reads fastest (packed on CPU)."""
        layer.weight = nn.Parameter(be.prepare_linear_weight(layer.weight.data), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, be: Backend, bias: torch.Tensor | None) -> torch.Tensor:
        return be.linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    """A linear layer's rank-local tensors; subclasses say how the whole one is split.

    Args:
        input_size, output_size: this rank's features (already divided).
        names: the checkpoint modules this layer holds (``model.layers.0.self_attn.q_proj``,
            ...): a quantized checkpoint's context chooses the method by them.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool, ctx: LayerContext,
                 method: LinearMethod | None = None, names: tuple[str, ...] = ()):
        super().__init__()
        self.ctx = ctx
        self.input_size, self.output_size = input_size, output_size
        if method is None and ctx.quantization is not None:
            method = ctx.quantization.for_layer(names)
        self.method = method or UnquantizedLinearMethod()
        self.dims = self.method.create_weights(self, input_size, output_size, ctx.dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=ctx.dtype), requires_grad=False)
            self.dims["bias"] = ParamDims(output_dim=0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: "torch.Tensor | QuantizedActivation | RowMaxActivation", be: Backend) -> torch.Tensor:
        return self.method.apply(self, x, be, self.bias)

    def prepare_weights(self, be: Backend) -> None:
        """Once, after loading: let the method put its tensors in the backend's preferred form."""
        prepare = getattr(self.method, "prepare", None)
        if prepare is not None:
            prepare(self, be)

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """This layer's prepared tensors where it is a plain ``x @ W.T (+ bias)`` on one rank, for
        a backend that fuses whole layers: (weight, None) unquantized, (int8 weight, per-column
        scales) for W8A8 (its method's ``int8_weights``); a method that wraps another (LoRA's)
        answers for itself (``fused_weight``); None where another method or a collective is in
        the way."""
        if self.ctx.tp_size != 1:
            return None
        if type(self.method) is UnquantizedLinearMethod:
            return self.weight, None
        own = getattr(self.method, "fused_weight", None)
        if own is not None:
            return own(self)
        int8_weights = getattr(self.method, "int8_weights", None)
        return None if int8_weights is None else int8_weights(self)

    def fused_lora(self) -> LinearLoRA | None:
        """This layer's adapters for a fused layer (its method's ``fused_lora``), or None."""
        lora = getattr(self.method, "fused_lora", None)
        return None if lora is None else lora()

    @property
    def takes_int8_input(self) -> bool:
        """Whether the producer of this layer's input should quantize it (per token) in the
        same pass and hand over a ``QuantizedActivation`` (a method that needs the float
        input, e.g. LoRA's wrapper, says no)."""
        return getattr(self.method, "takes_int8_input", False)

    # ---- loading -------------------------------------------------------------------
    def shards(self) -> tuple[Shard, ...]:
        return (None,)

    def full_sizes(self, shard: Shard) -> tuple[int, int]:
        """(output, input) features of the whole checkpoint tensor of ``shard``."""
        return self.output_size, self.input_size

    def source_slice(self, dim: int, is_output: bool, shard: Shard, tensor: torch.Tensor) -> torch.Tensor:
        """The part of the whole tensor along ``dim`` that this rank holds (replicated: all)."""
        return tensor

    def target_slice(self, dst: torch.Tensor, dim: int | None, shard: Shard) -> torch.Tensor:
        """Where ``shard`` goes in this rank's tensor (the whole tensor unless merged)."""
        return dst

    def weight_specs(self) -> tuple[WeightSpec, ...]:
        return tuple(WeightSpec(name, shard, self._full_shape(name, shard), self.dims[name].init)
                     for name in self.dims for shard in self.shards())

    def _full_shape(self, name: str, shard: Shard) -> tuple[int, ...]:
        """The whole checkpoint tensor of ``name`` (part ``shard``), before any rank's slicing."""
        dims, shape = self.dims[name], list(getattr(self, name).shape)
        out_full, in_full = self.full_sizes(shard)
        if dims.output_dim is not None:
            shape[dims.output_dim] = out_full
        if dims.input_dim is not None:
            shape[dims.input_dim] = in_full
        return tuple(shape)

    def load_weight(self, param: str, tensor: torch.Tensor, shard: Shard = None) -> None:
        if param not in self.dims or shard not in self.shards():
            raise ValueError(f"{type(self).__name__} has no tensor {param!r} (part {shard!r})")
        dims = self.dims[param]
        expected = self._full_shape(param, shard)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"shape {tuple(tensor.shape)}, expected {expected}")
        dst = self.target_slice(getattr(self, param).data, dims.output_dim, shard)
        src = tensor
        if dims.output_dim is not None:
            src = self.source_slice(dims.output_dim, True, shard, src)
        if dims.input_dim is not None:
            src = self.source_slice(dims.input_dim, False, shard, src)
        dst.copy_(read(src))


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool, ctx: LayerContext,
                 method: LinearMethod | None = None, names: tuple[str, ...] = ()):
        super().__init__(input_size, output_size, bias, ctx, method, names)


class ColumnParallelLinear(LinearBase):
    """Output features split over the ranks; the output stays split (no gather)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, ctx: LayerContext,
                 method: LinearMethod | None = None, names: tuple[str, ...] = ()):
        super().__init__(input_size, divide(output_size, ctx.tp_size, "output features"), bias, ctx, method, names)

    def full_sizes(self, shard: Shard) -> tuple[int, int]:
        return self.output_size * self.ctx.tp_size, self.input_size

    def source_slice(self, dim: int, is_output: bool, shard: Shard, tensor: torch.Tensor) -> torch.Tensor:
        if not is_output:
            return tensor
        n = self.output_size
        return tensor.narrow(dim, self.ctx.tp_rank * n, n)


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel layers stored as one (e.g. gate;up): part i is split on
    its own, so each rank holds [gate slice; up slice]."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, ctx: LayerContext,
                 method: LinearMethod | None = None, names: tuple[str, ...] = ()):
        self.full_parts = tuple(output_sizes)
        self.parts = tuple(divide(s, ctx.tp_size, "output features") for s in output_sizes)
        super().__init__(input_size, sum(self.parts), bias, ctx, method, names)

    def shards(self) -> tuple[Shard, ...]:
        return tuple(range(len(self.parts)))

    def full_sizes(self, shard: Shard) -> tuple[int, int]:
        return self.full_parts[shard], self.input_size

    def target_slice(self, dst: torch.Tensor, dim: int | None, shard: Shard) -> torch.Tensor:
        return dst.narrow(dim, sum(self.parts[:shard]), self.parts[shard]) if dim is not None else dst

    def source_slice(self, dim: int, is_output: bool, shard: Shard, tensor: torch.Tensor) -> torch.Tensor:
        if not is_output:
            return tensor
        n = self.parts[shard]
        return tensor.narrow(dim, self.ctx.tp_rank * n, n)

    def silu_and_mul_for_int8(self, x: "torch.Tensor | QuantizedActivation",
                              be: Backend) -> "QuantizedActivation | RowMaxActivation":
        """silu(gate) * up of this (gate;up) layer's output, for an int8 layer that reads it:
        from the method's matmul with SiLU-and-mul fused in where it has one for this batch
        (``apply_silu_and_mul``), else quantized per token in a pass of its own."""
        fused = getattr(self.method, "apply_silu_and_mul", None)
        gate_and_up = len(self.parts) == 2 and self.parts[0] == self.parts[1] and self.bias is None
        act = fused(self, x, be) if fused is not None and gate_and_up else None
        if act is not None:
            return act
        gate_up = self(x, be)
        return QuantizedActivation(*be.silu_and_mul_quant(gate_up), gate_up.dtype)


def check_head_split(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """ValueError unless heads split evenly over ``tp`` ranks and KV heads either split
    evenly or are replicated (``tp`` a multiple of them)."""
    divide(num_heads, tp, "attention heads")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} cannot be split over or replicated across tp={tp}")


class QKVParallelLinear(LinearBase):
    """q;k;v projections split by heads. With fewer KV heads than ranks, each KV head
    is held by ``tp / num_kv_heads`` consecutive ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 ctx: LayerContext, method: LinearMethod | None = None, names: tuple[str, ...] = ()):
        tp = ctx.tp_size
        check_head_split(num_heads, num_kv_heads, tp)
        self.head_dim = head_dim
        self.total_heads, self.total_kv_heads = num_heads, num_kv_heads
        self.num_heads = divide(num_heads, tp, "attention heads")
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias, ctx, method, names)

    def shards(self) -> tuple[Shard, ...]:
        return ("q", "k", "v")

    def full_sizes(self, shard: Shard) -> tuple[int, int]:
        heads = self.total_heads if shard == "q" else self.total_kv_heads
        return heads * self.head_dim, self.input_size

    def _part(self, shard: Shard) -> tuple[int, int]:
        """(offset in this rank's tensor, size) of a part."""
        return {"q": (0, self.q_size), "k": (self.q_size, self.kv_size),
                "v": (self.q_size + self.kv_size, self.kv_size)}[shard]

    def target_slice(self, dst: torch.Tensor, dim: int | None, shard: Shard) -> torch.Tensor:
        return dst.narrow(dim, *self._part(shard)) if dim is not None else dst

    def source_slice(self, dim: int, is_output: bool, shard: Shard, tensor: torch.Tensor) -> torch.Tensor:
        if not is_output:
            return tensor
        rank, tp = self.ctx.tp_rank, self.ctx.tp_size
        if shard == "q":
            first = rank * self.num_heads
        elif self.total_kv_heads >= tp:
            first = rank * self.num_kv_heads
        else:
            first = rank // (tp // self.total_kv_heads)
        size = self._part(shard)[1]
        return tensor.narrow(dim, first * self.head_dim, size)


class RowParallelLinear(LinearBase):
    """Input features split over the ranks (the input arrives split); the partial
    products are summed across ranks, then the bias is added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool, ctx: LayerContext,
                 method: LinearMethod | None = None, names: tuple[str, ...] = ()):
        super().__init__(divide(input_size, ctx.tp_size, "input features"), output_size, bias, ctx, method, names)

    def full_sizes(self, shard: Shard) -> tuple[int, int]:
        return self.output_size, self.input_size * self.ctx.tp_size

    def source_slice(self, dim: int, is_output: bool, shard: Shard, tensor: torch.Tensor) -> torch.Tensor:
        if is_output:
            return tensor
        n = self.input_size
        return tensor.narrow(dim, self.ctx.tp_rank * n, n)

    def forward(self, x: "torch.Tensor | QuantizedActivation", be: Backend) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return self.method.apply(self, x, be, self.bias)
        y = self.ctx.comm.all_reduce(self.method.apply(self, x, be, None))
        return y if self.bias is None else y + self.bias


__all__ = ["check_head_split", "ColumnParallelLinear", "LinearBase", "LinearMethod", "MergedColumnParallelLinear", "ParamDims",
           "QKVParallelLinear", "QuantizedActivation", "ReplicatedLinear", "RowMaxActivation", "RowParallelLinear", "UnquantizedLinearMethod"]
