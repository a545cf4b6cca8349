"""Loading weights into a model built from layers, and random weights of the same shapes.

Owns: ``WeightSpec`` (one loadable tensor of a layer: which parameter, which part
of a merged parameter, the whole checkpoint tensor's shape, how dummy weights
fill it), ``CheckpointSlice`` (a checkpoint tensor not read yet: a rank narrows
it to its part and reads only that), ``load_into`` (route checkpoint tensors to
their layers, then check that nothing was left out) and ``init_dummy_weights``. Every layer with weights
has ``weight_specs()`` and ``load_weight(param, tensor, shard)``, and slices the
whole tensor for its own rank, so a checkpoint, a GGUF file and dummy weights all
go through the same per-rank path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Iterator, Protocol

import torch
from torch import nn

Shard = Hashable | None  # a part of a merged parameter ("q", "k", "v", 0, 1, ...); None: the whole


@dataclass(frozen=True)
class WeightSpec:
    param: str
    shard: Shard
    full_shape: tuple[int, ...]  # the whole checkpoint tensor, before any rank's slicing
    init: str = "normal"  # dummy weights: "normal" (std 0.02), "ones", "int8" (uniform) or "const:<value>"


class CheckpointSlice:
    """A tensor of an open safetensors file, read only when ``read()`` is called and then
    only the part ``narrow`` kept (so each rank reads its slice, not the whole tensor)."""

    def __init__(self, source: Any, shape: tuple[int, ...] | None = None,
                 index: tuple[slice, ...] | None = None):
        self._source = source  # safetensors' PySafeSlice
        self.shape = tuple(shape if shape is not None else source.get_shape())
        self._index = index if index is not None else tuple(slice(0, n) for n in self.shape)

    def narrow(self, dim: int, start: int, length: int) -> "CheckpointSlice":
        dim %= len(self.shape)
        base = self._index[dim].start
        index = self._index[:dim] + (slice(base + start, base + start + length),) + self._index[dim + 1:]
        shape = self.shape[:dim] + (length,) + self.shape[dim + 1:]
        return CheckpointSlice(self._source, shape, index)

    def read(self) -> torch.Tensor:
        return self._source[self._index]


def read(tensor: "torch.Tensor | CheckpointSlice") -> torch.Tensor:
    """The values of a tensor or of a checkpoint slice (read from the file now)."""
    return tensor.read() if isinstance(tensor, CheckpointSlice) else tensor


@dataclass(frozen=True)
class CheckpointTensor:
    """One checkpoint tensor routed to a layer: ``module`` path, its ``param`` and ``shard``."""
    source: str  # the checkpoint's name, for error messages
    module: str
    param: str
    shard: Shard
    tensor: "torch.Tensor | CheckpointSlice"


class Loadable(Protocol):
    def weight_specs(self) -> tuple[WeightSpec, ...]: ...

    def load_weight(self, param: str, tensor: torch.Tensor, shard: Shard = None) -> None: ...


def loadable_modules(model: nn.Module) -> Iterator[tuple[str, Loadable]]:
    for path, module in model.named_modules():
        if hasattr(module, "weight_specs"):
            yield path, module  # type: ignore[misc]


@torch.no_grad()
def load_into(model: nn.Module, tensors: Iterable[CheckpointTensor], architecture: str) -> None:
    """Load every routed tensor into its layer; ValueError naming the tensor on a
    misplaced or misshapen one, or naming what is missing at the end."""
    modules = dict(loadable_modules(model))
    loaded: set[tuple[str, str, Shard]] = set()
    for item in tensors:
        module = modules.get(item.module)
        if module is None:
            raise ValueError(f"checkpoint tensor {item.source!r} has no place in {architecture}")
        try:
            module.load_weight(item.param, item.tensor, item.shard)
        except ValueError as exc:
            raise ValueError(f"checkpoint tensor {item.source!r}: {exc}") from None
        loaded.add((item.module, item.param, item.shard))
    expected = {(path, s.param, s.shard) for path, m in modules.items() for s in m.weight_specs()}
    missing = sorted(expected - loaded, key=str)
    if missing:
        names = [f"{path}.{param}" + (f"[{shard}]" if shard is not None else "") for path, param, shard in missing]
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {names[:3]}")


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int, device: torch.device) -> None:
    """Random weights: every whole tensor is drawn in a fixed order from one generator,
    then each layer keeps its rank's slice (so every tp size sees the same model)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for _, module in loadable_modules(model):
        for spec in module.weight_specs():
            if spec.init == "ones":
                full = torch.ones(spec.full_shape, device=device)
            elif spec.init == "int8":
                full = torch.randint(-127, 128, spec.full_shape, device=device, generator=gen, dtype=torch.int8)
            elif spec.init.startswith("const:"):
                full = torch.full(spec.full_shape, float(spec.init[6:]), device=device)
            else:
                full = torch.empty(spec.full_shape, device=device).normal_(0.0, 0.02, generator=gen)
            module.load_weight(spec.param, full, spec.shard)
