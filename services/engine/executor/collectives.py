"""Collectives of one tensor-parallel group over a torch.distributed process group.

Owns: ``ProcessGroupComm``, the ``Communicator`` layers use when a group has more
than one rank (gloo on CPU, NCCL on CUDA), and the host seconds spent in its
collectives (``seconds``, for the per-rank metrics: gloo's calls block until done;
NCCL's only queue the collective on the GPU, and inside a CUDA graph they are not
called at all, so there the figure is launch time, not transfer time). The process
group itself is created and destroyed by whoever starts the rank processes; this
object only uses it.
"""
from __future__ import annotations

from typing import Any

import time

import torch
import torch.distributed as dist


class ProcessGroupComm:
    def __init__(self, group: Any = None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.seconds = 0.0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        dist.all_reduce(x, group=self.group)
        self.seconds += time.perf_counter() - start
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        start = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        self.seconds += time.perf_counter() - start
        return torch.cat(parts, dim=dim)

    def all_to_all(self, x: torch.Tensor, send_rows: list[int],
                   recv_rows: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        start = time.perf_counter()
        if recv_rows is None:
            counts = torch.tensor(send_rows, dtype=torch.int64, device=x.device)
            received = torch.empty_like(counts)
            dist.all_to_all_single(received, counts, group=self.group)
            recv_rows = received.tolist()
        out = x.new_empty((sum(recv_rows), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_rows, list(send_rows), group=self.group)
        self.seconds += time.perf_counter() - start
        return out, recv_rows


__all__ = ["ProcessGroupComm"]
