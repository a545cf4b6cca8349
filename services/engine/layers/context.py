"""What a layer needs to know about its rank when it is built.

Owns: ``LayerContext`` (frozen: tensor-parallel rank and size, the communicator
of that group, the parameter dtype, a quantized checkpoint's linear methods)
and the ``Communicator`` interface layers use for their collectives.
``SingleRank`` is the communicator of one rank (every collective is the
identity); the torch.distributed one lives with the rank processes that own
the process group. A context is built once per rank, at model construction,
and passed down explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class Communicator(Protocol):
    """Collectives over the ranks of one tensor-parallel group."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks (may reuse ``x``'s storage)."""

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The ranks' ``x`` concatenated along ``dim``, in rank order."""


class LinearMethods(Protocol):
    """A quantized checkpoint's choice of linear method per layer (``pdserve.engine.quant``)."""

    name: str

    def for_layer(self, modules: tuple[str, ...]) -> Any:
        """The ``LinearMethod`` of a layer holding checkpoint modules ``modules`` (None: unquantized)."""


class SingleRank:
    """The communicator of a group of one: nothing to exchange."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class LayerContext:
    """Args:
        dtype: dtype of unquantized parameters.
        tp_rank, tp_size: this rank's place in its tensor-parallel group.
        comm: the group's collectives (``SingleRank`` for tp_size 1).
        quantization: the quantized checkpoint's choice of linear method per layer
            (None: unquantized).
        ep_size: 1, or tp_size: the group's ranks then split the experts of MoE layers
            among them (expert parallelism; rank r holds the r-th share) instead of
            splitting every expert's intermediate size.
    """

    dtype: torch.dtype = torch.float32
    tp_rank: int = 0
    tp_size: int = 1
    comm: Communicator = field(default_factory=SingleRank, compare=False)
    quantization: LinearMethods | None = None
    ep_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={self.tp_rank} is outside a group of tp_size={self.tp_size}")
        if self.ep_size not in (1, self.tp_size):
            raise ValueError(f"ep={self.ep_size} must be 1 or equal tp={self.tp_size}: the ranks of one worker "
                             "share its MoE layers")


def divide(total: int, parts: int, what: str) -> int:
    """``total / parts``; a clear error when it does not divide."""
    if total % parts:
        raise ValueError(f"{what}={total} cannot be split evenly over tp={parts}")
    return total // parts
