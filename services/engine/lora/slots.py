"""Every loaded LoRA adapter of one rank, stacked beside the linear layers it targets.

Owns: for each targeted (layer, part) the stacked ``A [S, r_max, in]`` and
``B [S, out, r_max]`` of the S adapters (zero-padded to the largest rank, ``B``
pre-multiplied by the adapter's scaling, each sliced for this rank like the base
layer's weight: column-parallel layers split ``B``'s rows, row-parallel layers ``A``'s
columns, whose partial products the layer's all-reduce then sums), the adapter names
by slot, and the rows of the current step by slot.

Lifecycle: ``AdapterSlots(model, adapters, ...)`` checks every adapter against the
model and wraps the targeted layers' ``LinearMethod`` with ``LoRALinearMethod`` ->
per step ``set_rows`` (each row's slot, -1 for the base model) before the forward ->
the wrapped layers add ``(x @ A[s].T) @ B[s].T`` to the rows of each slot ``s``.

NOTE: rows are grouped by slot with index tensors (a segmented gather/scatter per
adapter present in the step); steps with adapters run eagerly (no captured graphs).
"""
from __future__ import annotations

import torch
from torch import nn

from pdserve.engine.backends.base import Backend
from pdserve.engine.layers import LinearBase, LinearMethod
from pdserve.engine.lora.peft_format import PeftAdapter

Parts = dict[object, tuple[torch.Tensor, torch.Tensor]]  # part of a merged layer -> (A stack, B stack)


class StepRows:
    """The current step's rows, grouped by adapter slot."""

    def __init__(self) -> None:
        self.groups: list[tuple[int, torch.Tensor]] = []


class LoRALinearMethod:
    """The base layer's matmul plus the LoRA delta of each row's adapter."""

    def __init__(self, base: LinearMethod, parts: Parts, rows: StepRows):
        self.base, self.parts, self.rows = base, parts, rows

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype):
        return self.base.create_weights(layer, input_size, output_size, dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, be: Backend, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.base.apply(layer, x, be, bias)
        for slot, rows in self.rows.groups:
            xs = x.index_select(0, rows)
            for part, (a, b) in self.parts.items():
                delta = (xs @ a[slot].t()) @ b[slot].t()
                layer.target_slice(y, y.dim() - 1, part).index_add_(0, rows, delta.to(y.dtype))
        return y


class AdapterSlots:
    def __init__(self, model: nn.Module, adapters: list[PeftAdapter], device: torch.device, dtype: torch.dtype):
        self.names = [a.name for a in adapters]
        self._slot = {name: i for i, name in enumerate(self.names)}
        self.rows = StepRows()
        self._device = device
        modules = dict(model.named_modules())
        r_max = max(a.rank for a in adapters)
        stacks: dict[str, Parts] = {}
        for slot, adapter in enumerate(adapters):
            for path, (a, b) in adapter.weights.items():
                layer, part, a_local, b_local = self._place(model, modules, adapter, path, a, b)
                parts = stacks.setdefault(layer, {})
                if part not in parts:
                    parts[part] = (torch.zeros(len(adapters), r_max, a_local.shape[1], dtype=dtype, device=device),
                                   torch.zeros(len(adapters), b_local.shape[0], r_max, dtype=dtype, device=device))
                parts[part][0][slot, :adapter.rank] = a_local.to(dtype)
                parts[part][1][slot, :, :adapter.rank] = (b_local * adapter.scaling).to(dtype)
        for path, parts in stacks.items():
            layer = modules[path]
            layer.method = LoRALinearMethod(layer.method, parts, self.rows)

    def slot(self, name: str | None) -> int:
        """The slot of adapter ``name`` (-1: the base model); KeyError when not loaded."""
        return -1 if name is None else self._slot[name]

    def set_rows(self, slots: list[int], counts: list[int]) -> None:
        """Row i of the step has ``counts[i]`` tokens and adapter ``slots[i]``."""
        per_token = torch.repeat_interleave(torch.tensor(slots, dtype=torch.long), torch.tensor(counts))
        self.rows.groups = [(s, (per_token == s).nonzero().flatten().to(self._device))
                            for s in sorted(set(slots)) if s >= 0]

    @staticmethod
    def _place(model: nn.Module, modules: dict[str, nn.Module], adapter: PeftAdapter, path: str,
               a: torch.Tensor, b: torch.Tensor) -> tuple[str, object, torch.Tensor, torch.Tensor]:
        """(our layer's path, its part, A and B sliced for this rank); ValueError if it does not fit."""
        routed = model.route_tensor(f"{path}.weight", a)
        layer = modules.get(routed.module)
        if not isinstance(layer, LinearBase) or routed.param != "weight":
            raise ValueError(f"adapter {adapter.name!r} targets {path!r}, which is not a linear layer LoRA can "
                             "wrap in this model")
        out_full, in_full = layer.full_sizes(routed.shard)
        if tuple(a.shape) != (adapter.rank, in_full) or tuple(b.shape) != (out_full, adapter.rank):
            raise ValueError(f"adapter {adapter.name!r}: {path} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                             f"but the base layer needs A ({adapter.rank}, {in_full}) and B ({out_full}, "
                             f"{adapter.rank})")
        a_local = layer.source_slice(1, False, routed.shard, a)
        b_local = layer.source_slice(0, True, routed.shard, b)
        return routed.module, routed.shard, a_local, b_local


__all__ = ["AdapterSlots", "LoRALinearMethod", "StepRows"]
