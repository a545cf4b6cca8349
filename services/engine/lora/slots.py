"""Every registered LoRA adapter of one rank: in host memory, and the resident ones stacked
beside the linear layers they target.

Owns: the registered adapters' weights in host memory (each checked against the model
and sliced for this rank once, at registration); ``max_loras`` device slots; for every
linear layer of the model that LoRA wraps (qkv, o, gate_up, down, ...: every one, or
those holding a module of ``targets``, e.g. ``{"q_proj", "v_proj"}`` wraps qkv) the stacked
``A [max_loras, parts * max_lora_rank, in]`` (part p of a merged layer in rows
[p R, (p + 1) R)) and ``B [max_loras, out, max_lora_rank]`` (rows in the layer's output
order) (an adapter zero-padded to the maximum rank, ``B`` pre-multiplied by its scaling,
each sliced for this rank like the base layer's weight: column-parallel layers split
``B``'s rows, row-parallel layers ``A``'s columns, whose partial products the layer's
all-reduce then sums); the adapter names by slot; the step's slot per token
(``rows.StepRows``).

Lifecycle: ``AdapterSlots(model, capacity, max_rank, ...)`` makes every stack (zeros) and
wraps every linear layer's ``LinearMethod`` with ``LoRALinearMethod``, before the rank
captures its decode graphs (inside ``capturing()``), so the graphs hold the LoRA kernels
-> ``register(adapter)`` (at start or at run time: checked against the model first, so a
bad adapter changes nothing) -> ``activate(slot, name)`` when the scheduler's plan puts it
in a slot (the slot's previous adapter is gone from the device; stacks it does not target
stay zero for it; its rank goes to the step's ``LoRAMapping``, so the CPU kernel skips the
padding past it) -> per step ``set_rows`` (each row's slot, -1 for the base model)
before the forward -> each wrapped layer adds ``(x @ A[s].T) @ B[s].T`` to the tokens of
each slot ``s``, one ``Backend.lora_delta`` per layer (all its parts: one shrink of the
shared input) -> ``unload(name)`` forgets it
and zeroes its slot if it has one.

NOTE (memory): the stacks take ``max_loras * max_lora_rank * (in + out) * dtype size`` per
part (q, k, v, o, gate, up, down) of each wrapped layer, whichever parts the adapters train: for
Llama-3-8B in bf16 (in + out summed over the seven: 81,920 per layer; 32 layers) 1.34 GB at 16 slots x rank
16 or at the default 4 slots x rank 64, 5.4 GB at 64 slots x rank 16. They are allocated
before the KV cache is sized, so the cache gets what is left.
NOTE (W8A8): a wrapped layer takes float input (the delta needs it), so the op before a
wrapped int8 layer no longer quantizes in its own pass; the int8 method does. Layers not
wrapped keep their fused quantization.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from pdserve.engine.backends.base import Backend, LinearLoRA
from pdserve.engine.layers import LinearBase, LinearMethod, UnquantizedLinearMethod
from pdserve.engine.lora.peft_format import PeftAdapter
from pdserve.engine.lora.rows import StepRows


@dataclass(frozen=True)
class LayerStack:
    """One linear layer's A and B stacks over the slots, all its parts in each."""
    a: torch.Tensor  # [slots, parts * R, in]
    b: torch.Tensor  # [slots, out, R]
    parts: tuple[object, ...]  # the layer's parts (shards), in output order
    part_ends: tuple[int, ...]  # where each part's columns end in the layer's output

    def part_a(self, slot: int, part: object) -> torch.Tensor:
        """Rows of ``part``'s A in slot ``slot`` ([R, in])."""
        rank = self.b.shape[2]
        return self.a[slot].narrow(0, self.parts.index(part) * rank, rank)

    def part_b(self, slot: int, part: object) -> torch.Tensor:
        """Rows of ``part``'s B in slot ``slot`` ([its out, R])."""
        i = self.parts.index(part)
        begin = self.part_ends[i - 1] if i else 0
        return self.b[slot].narrow(0, begin, self.part_ends[i] - begin)


class LoRALinearMethod:
    """The base layer's matmul plus the LoRA delta of each token's adapter."""

    def __init__(self, base: LinearMethod, stack: LayerStack, rows: StepRows):
        self.base, self.stack, self.rows = base, stack, rows

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype):
        return self.base.create_weights(layer, input_size, output_size, dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, be: Backend, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.base.apply(layer, x, be, bias)
        mapping = self.rows.mapping(x.shape[0])
        if mapping is not None:
            be.lora_delta(y, x, self.stack.a, self.stack.b, mapping, self.stack.part_ends)
        return y

    def fused_weight(self, layer: LinearBase) -> tuple[torch.Tensor, None] | None:
        """The base weight for a fused layer that adds this method's deltas itself (``fused_lora``):
        an unquantized base only."""
        return (layer.weight, None) if type(self.base) is UnquantizedLinearMethod else None

    def fused_lora(self) -> LinearLoRA:
        return LinearLoRA(self.stack.a, self.stack.b, self.stack.part_ends, self.rows.mapping)


Placed = list[tuple[str, object, torch.Tensor, torch.Tensor]]  # (layer, part, A, B * scaling) for this rank


class AdapterSlots:
    """One rank's adapters: host copies, device slots, and the wrapped linear layers.

    Args:
        capacity: ``max_loras`` device slots; max_rank: ``max_lora_rank``.
        max_tokens: the most tokens of a step whose slots live in the graphs' buffers
            (at least the largest captured batch).
        pin_memory: copy each step's slots from page-locked memory (accelerators).
        targets: the module names (``q_proj``, ...) whose layers are wrapped; None: every
            linear layer.
    """

    def __init__(self, model: nn.Module, capacity: int, max_rank: int, device: torch.device, dtype: torch.dtype,
                 max_tokens: int = 2048, pin_memory: bool = False, targets: frozenset[str] | None = None):
        self.capacity, self.max_rank, self.targets = capacity, max_rank, targets
        self.rows = StepRows(capacity, max_tokens, device, pin_memory)
        self._model, self._modules = model, dict(model.named_modules())
        self._device, self._dtype = device, dtype
        self._host: dict[str, Placed] = {}  # every registered adapter, in host memory
        self._slot: dict[str, int] = {}  # the resident ones
        self._stacks: dict[str, LayerStack] = self._wrap_linear_layers()  # layer path -> its stacks

    @property
    def names(self) -> list[str]:
        return sorted(self._host)

    @property
    def stack_bytes(self) -> int:
        """Device memory of all A and B stacks."""
        return sum(t.numel() * t.element_size() for stack in self._stacks.values() for t in (stack.a, stack.b))

    def slot(self, name: str | None) -> int:
        """The slot of adapter ``name`` (-1: the base model); KeyError when not resident."""
        return -1 if name is None else self._slot[name]

    @property
    def active(self) -> bool:
        """Whether some token of the current step has an adapter."""
        return self.rows.active

    def capturing(self) -> contextlib.AbstractContextManager[None]:
        """Context of the decode graphs' capture: the wrapped layers launch their kernels."""
        return self.rows.capturing()

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

    @torch.inference_mode()  # NOTE: the stacks are made inside inference mode; only it may write them
    def activate(self, slot: int, name: str) -> None:
        """Copy registered adapter ``name`` into device slot ``slot`` (whatever was there is gone)."""
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} is outside max_loras={self.capacity}")
        for other in [n for n, s in self._slot.items() if s == slot]:
            del self._slot[other]
        self._zero(slot)
        for layer, part, a, b in self._host[name]:
            stack = self._stacks[layer]
            stack.part_a(slot, part)[:a.shape[0]].copy_(a, non_blocking=True)
            stack.part_b(slot, part)[:, :b.shape[1]].copy_(b, non_blocking=True)
        self._slot[name] = slot
        self.rows.set_rank(slot, max((a.shape[0] for _, _, a, _ in self._host[name]), default=0))

    @torch.inference_mode()
    def unload(self, name: str) -> None:
        """Forget ``name`` (its slot zeroed, so a later adapter there starts clean); KeyError when unknown."""
        del self._host[name]
        slot = self._slot.pop(name, None)
        if slot is not None:
            self._zero(slot)
            self.rows.set_rank(slot, 0)

    def _zero(self, slot: int) -> None:
        for stack in self._stacks.values():
            stack.a[slot].zero_()
            stack.b[slot].zero_()

    def set_rows(self, slots: list[int], counts: list[int]) -> None:
        """Row i of the step has ``counts[i]`` tokens and adapter slot ``slots[i]`` (-1: none)."""
        per_token = torch.repeat_interleave(torch.tensor(slots, dtype=torch.int32),
                                            torch.tensor(counts, dtype=torch.long))
        self.rows.write(per_token)

    @torch.inference_mode()
    def _wrap_linear_layers(self) -> dict[str, LayerStack]:
        """Zero stacks for every targeted linear layer, each such layer's method wrapped."""
        stacks: dict[str, LayerStack] = {}
        for path, layer in self._modules.items():
            if isinstance(layer, LinearBase) and self._targeted(path):
                stacks[path] = self._new_stack(layer)
                layer.method = LoRALinearMethod(layer.method, stacks[path], self.rows)
        return stacks

    def _targeted(self, path: str) -> bool:
        """Whether the layer at ``path`` holds one of the target modules (its parts' own names)."""
        if self.targets is None:
            return True
        owner = path.rpartition(".")[0]
        meta = torch.empty(0, device="meta")
        return any(self._model.route_tensor(f"{owner}.{name}.weight", meta).module == path for name in self.targets)

    def _new_stack(self, layer: LinearBase) -> LayerStack:
        parts, ends = layer.shards(), []
        for part in parts:  # NOTE: the parts must tile the output in order (one expand writes them all)
            piece = layer.target_slice(torch.empty(layer.output_size, device="meta"), 0, part)
            if piece.storage_offset() != (ends[-1] if ends else 0):
                raise ValueError(f"{type(layer).__name__}: part {part!r} does not follow the one before it")
            ends.append(piece.storage_offset() + piece.shape[0])
        if ends[-1] != layer.output_size:
            raise ValueError(f"{type(layer).__name__}: its parts do not cover its output")
        zeros = dict(dtype=self._dtype, device=self._device)
        return LayerStack(a=torch.zeros(self.capacity, len(parts) * self.max_rank, layer.input_size, **zeros),
                          b=torch.zeros(self.capacity, layer.output_size, self.max_rank, **zeros),
                          parts=tuple(parts), part_ends=tuple(ends))

    def _place(self, adapter: PeftAdapter, path: str, a: torch.Tensor,
               b: torch.Tensor) -> tuple[str, object, torch.Tensor, torch.Tensor]:
        """(our layer's path, its part, A and B sliced for this rank); ValueError if it does not fit."""
        routed = self._model.route_tensor(f"{path}.weight", a)
        layer = self._modules.get(routed.module)
        if not isinstance(layer, LinearBase) or routed.param != "weight":
            raise ValueError(f"adapter {adapter.name!r} targets {path!r}, which is not a linear layer LoRA can "
                             "wrap in this model")
        if routed.module not in self._stacks:
            raise ValueError(f"adapter {adapter.name!r} targets {path!r}, but this engine wraps only the "
                             f"lora_target_modules {sorted(self.targets or ())}")
        out_full, in_full = layer.full_sizes(routed.shard)
        if tuple(a.shape) != (adapter.rank, in_full) or tuple(b.shape) != (out_full, adapter.rank):
            raise ValueError(f"adapter {adapter.name!r}: {path} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                             f"but the base layer needs A ({adapter.rank}, {in_full}) and B ({out_full}, "
                             f"{adapter.rank})")
        a_local = layer.source_slice(1, False, routed.shard, a)
        b_local = layer.source_slice(0, True, routed.shard, b)
        return routed.module, routed.shard, a_local, b_local


__all__ = ["AdapterSlots", "LayerStack", "LoRALinearMethod"]
