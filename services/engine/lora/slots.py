"""Every registered LoRA adapter of one rank: in host memory, and the resident ones stacked
beside the linear layers they target.

Owns: the registered adapters' weights in host memory (each checked against the model
and sliced for this rank once, at registration); ``max_loras`` device slots; for each
(layer, part) any adapter has targeted,
the stacked ``A [max_loras, max_lora_rank, in]`` and ``B [max_loras, out,
max_lora_rank]`` (an adapter zero-padded to the maximum rank, ``B`` pre-multiplied by
its scaling, each sliced for this rank like the base layer's weight: column-parallel
layers split ``B``'s rows, row-parallel layers ``A``'s columns, whose partial products
the layer's all-reduce then sums); the adapter names by slot; the rows of the current
step by slot.

Lifecycle: ``AdapterSlots(model, capacity, max_rank, ...)`` -> ``register(adapter)``
(at start or at run time: checked against the model first, so a bad adapter changes
nothing) -> ``activate(slot, name)`` when the scheduler's plan puts it in a slot
(the first adapter to target a layer wraps its ``LinearMethod`` with
``LoRALinearMethod``; the slot's previous adapter is gone from the device) -> per step
``set_rows`` (each row's slot, -1 for the base model) before the forward -> the
wrapped layers add ``(x @ A[s].T) @ B[s].T`` to the rows of each slot ``s`` ->
``unload(name)`` forgets it and zeroes its slot if it has one.

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


Placed = list[tuple[str, object, torch.Tensor, torch.Tensor]]  # (layer, part, A, B * scaling) for this rank


class AdapterSlots:
    def __init__(self, model: nn.Module, capacity: int, max_rank: int, device: torch.device, dtype: torch.dtype):
        self.capacity, self.max_rank = capacity, max_rank
        self.rows = StepRows()
        self._model, self._modules = model, dict(model.named_modules())
        self._device, self._dtype = device, dtype
        self._host: dict[str, Placed] = {}  # every registered adapter, in host memory
        self._slot: dict[str, int] = {}  # the resident ones
        self._stacks: dict[str, Parts] = {}  # layer path -> its parts' stacks (made on first use)

    @property
    def names(self) -> list[str]:
        return sorted(self._host)

    def slot(self, name: str | None) -> int:
        """The slot of adapter ``name`` (-1: the base model); KeyError when not resident."""
        return -1 if name is None else self._slot[name]

    def register(self, adapter: PeftAdapter) -> None:
        """Check an adapter against the model and keep this rank's slices of it in host
        memory; ValueError (and nothing changed) when it does not fit."""
        if adapter.name in self._host:
            raise ValueError(f"adapter {adapter.name!r} is already loaded")
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter {adapter.name!r}: rank r={adapter.rank} is above max_lora_rank={self.max_rank}")
        placed = [self._place(adapter, path, a, b) for path, (a, b) in adapter.weights.items()]
        self._host[adapter.name] = [(layer, part, a.to(self._dtype).contiguous(),
                                     (b * adapter.scaling).to(self._dtype).contiguous())
                                    for layer, part, a, b in placed]

    @torch.inference_mode()  # NOTE: the stacks are made inside a step's inference mode; only it may write them
    def activate(self, slot: int, name: str) -> None:
        """Copy registered adapter ``name`` into device slot ``slot`` (whatever was there is gone)."""
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} is outside max_loras={self.capacity}")
        for other in [n for n, s in self._slot.items() if s == slot]:
            del self._slot[other]
        self._zero(slot)
        for layer, part, a, b in self._host[name]:
            a_stack, b_stack = self._stack(layer, part, a.shape[1], b.shape[0])
            a_stack[slot, :a.shape[0]].copy_(a, non_blocking=True)
            b_stack[slot, :, :b.shape[1]].copy_(b, non_blocking=True)
        self._slot[name] = slot

    @torch.inference_mode()
    def unload(self, name: str) -> None:
        """Forget ``name`` (its slot zeroed, so a later adapter there starts clean); KeyError when unknown."""
        del self._host[name]
        slot = self._slot.pop(name, None)
        if slot is not None:
            self._zero(slot)

    def _zero(self, slot: int) -> None:
        for parts in self._stacks.values():
            for a_stack, b_stack in parts.values():
                a_stack[slot].zero_()
                b_stack[slot].zero_()

    def set_rows(self, slots: list[int], counts: list[int]) -> None:
        """Row i of the step has ``counts[i]`` tokens and adapter ``slots[i]``."""
        if all(s < 0 for s in slots):
            self.rows.groups = []
            return
        per_token = torch.repeat_interleave(torch.tensor(slots, dtype=torch.long), torch.tensor(counts))
        self.rows.groups = [(s, (per_token == s).nonzero().flatten().to(self._device))
                            for s in sorted(set(slots)) if s >= 0]

    def _stack(self, path: str, part: object, in_local: int, out_local: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, B) stacks of one layer's part, made (and the layer wrapped) on first use."""
        parts = self._stacks.get(path)
        if parts is None:
            parts = self._stacks[path] = {}
            layer = self._modules[path]
            layer.method = LoRALinearMethod(layer.method, parts, self.rows)
        if part not in parts:
            parts[part] = (torch.zeros(self.capacity, self.max_rank, in_local, dtype=self._dtype, device=self._device),
                           torch.zeros(self.capacity, out_local, self.max_rank, dtype=self._dtype,
                                       device=self._device))
        return parts[part]

    def _place(self, adapter: PeftAdapter, path: str, a: torch.Tensor,
               b: torch.Tensor) -> tuple[str, object, torch.Tensor, torch.Tensor]:
        """(our layer's path, its part, A and B sliced for this rank); ValueError if it does not fit."""
        routed = self._model.route_tensor(f"{path}.weight", a)
        layer = self._modules.get(routed.module)
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
