"""What a layer needs to know about its rank when it is built.

Owns: ``LayerContext`` (frozen: tensor-parallel rank and size, the communicator
of that group, the expert-parallel rank, size and communicator, the parameter
dtype, a quantized checkpoint's linear methods)
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

    def all_to_all(self, x: torch.Tensor, send_rows: list[int],
                   recv_rows: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Rows ``x[sum(send_rows[:i]):][:send_rows[i]]`` to rank i; returns the rows every rank sent
        here (in rank order) and how many came from each. ``recv_rows``, when the caller knows
        them (a reply), saves exchanging the counts."""


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

    def all_to_all(self, x: torch.Tensor, send_rows: list[int],
                   recv_rows: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        return x, list(send_rows)


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
            splitting every expert's intermediate size; or tp_size x replicas: every
            rank of ``replicas`` data-parallel replicas holds a share, and each MoE
            layer gathers the replicas' tokens over ``ep_comm``.
        ep_rank: this rank's share of the experts (default: tp_rank).
        ep_comm: the collectives of the ranks that split the experts (default: comm).
        replicas: data-parallel replicas sharing the MoE layers (1: none).
        all_to_all_tokens: with replicas, a MoE layer exchanges tokens all-to-all when some replica
            has at least this many in the step (else by a padded all-gather).
    """

    dtype: torch.dtype = torch.float32
    tp_rank: int = 0
    tp_size: int = 1
    comm: Communicator = field(default_factory=SingleRank, compare=False)
    quantization: LinearMethods | None = None
    ep_size: int = 1
    ep_rank: int | None = None
    ep_comm: Communicator | None = field(default=None, compare=False)
    replicas: int = 1
    all_to_all_tokens: int = 256

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={self.tp_rank} is outside a group of tp_size={self.tp_size}")
        if self.ep_size not in (1, self.tp_size, self.tp_size * self.replicas):
            raise ValueError(f"ep={self.ep_size} must be 1, tp={self.tp_size} or tp x {self.replicas} replicas: "
                             "the ranks that share the MoE layers")
        if self.ep_size > 1 and not 0 <= self.expert_rank < self.ep_size:
            raise ValueError(f"ep_rank={self.ep_rank} is outside ep={self.ep_size}")

    @property
    def expert_rank(self) -> int:
        """This rank's share of the experts (with ep > 1)."""
        return self.tp_rank if self.ep_rank is None else self.ep_rank

    @property
    def expert_comm(self) -> Communicator:
        """The collectives of the ranks that split the experts."""
        return self.comm if self.ep_comm is None else self.ep_comm

    @property
    def experts_span_replicas(self) -> bool:
        return self.replicas > 1 and self.ep_size == self.tp_size * self.replicas


def divide(total: int, parts: int, what: str) -> int:
    """``total / parts``; a clear error when it does not divide."""
    if total % parts:
        raise ValueError(f"{what}={total} cannot be split evenly over tp={parts}")
    return total // parts
