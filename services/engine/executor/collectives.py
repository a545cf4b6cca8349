"""Collectives of one tensor-parallel group over a torch.distributed process group.

Owns: ``ProcessGroupComm``, the ``Communicator`` layers use when a group has more
than one rank (gloo on CPU, NCCL on CUDA). The process group itself is created
and destroyed by whoever starts the rank processes; this object only uses it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class ProcessGroupComm:
    def __init__(self, group: Any = None):
        self.group = group
        self.size = dist.get_world_size(group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


__all__ = ["ProcessGroupComm"]
