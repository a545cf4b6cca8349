"""The data-parallel replicas that share MoE layers (ep = dp x tp): their process group and lockstep.

Owns: the gloo process group of every rank of the ``dp`` replica engines of one
worker (dp x tp ranks meeting on 127.0.0.1:``port``; rank ``dp_rank * tp + tp_rank``),
each replica's tensor-parallel subgroup, the communicator the MoE layers gather tokens
over (all ranks), and the step handshake that keeps the replicas in lockstep: every MoE
layer is a collective, so when any replica runs a step, every rank of every replica runs
one, replicas without tokens joining the MoE layers only.

Lifecycle: ``ReplicaGroup(...)`` joins (blocks until every rank has; in the engine's
process with tp 1, in each rank process otherwise) -> ``wait_for_all(timeout)`` once
the rank is allocated (replicas load at different speeds; the step collectives then
time out after ``timeout`` seconds only) -> per step ``sync(num_tokens)``, the first
collective of every step of every rank -> ``close()``.

NOTE: a replica that stops stepping (exited, or its engine left the loop) makes the
others' next collective fail or time out: the worker fails as a whole, as with a
dead rank.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from pdserve.engine.executor.collectives import ProcessGroupComm
from pdserve.engine.executor.multiproc import RankFailure


class ReplicaGroup:
    """Args:
        rank: this replica's ``dp_rank``; size: ``dp``; port: where the group meets.
        timeout: seconds a collective may wait for a silent rank (the rank timeout).
        tp_rank, tp_size: this rank's place in its replica.
    """

    def __init__(self, rank: int, size: int, port: int, timeout: float, tp_rank: int = 0, tp_size: int = 1):
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a process group; a replica sharing MoE "
                               "layers runs each rank in a process of its own")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank * tp_size + tp_rank,
                                world_size=size * tp_size, timeout=timedelta(seconds=timeout))
        self.rank, self.size, self.tp_size = rank, size, tp_size
        self.expert_rank = rank * tp_size + tp_rank  # this rank's share of every MoE layer's experts
        self.comm = ProcessGroupComm()
        self.tp_comm = None
        if tp_size > 1:  # NOTE: every rank creates every replica's subgroup, in the same order (new_group's rule)
            subgroups = [dist.new_group(list(range(d * tp_size, (d + 1) * tp_size))) for d in range(size)]
            self.tp_comm = ProcessGroupComm(subgroups[rank])

    def wait_for_all(self, timeout: float) -> None:
        """Return once every replica is ready to step (RuntimeError naming the missing ones)."""
        dist.monitored_barrier(timeout=timedelta(seconds=timeout), wait_all_ranks=True)

    def sync(self, num_tokens: int) -> int:
        """The tokens all replicas compute this step (0: every replica is idle); every rank of a
        replica passes the replica's count."""
        total = torch.tensor([num_tokens], dtype=torch.int64)
        try:
            dist.all_reduce(total)
        except RuntimeError as exc:  # NOTE: gloo's error when a peer is gone or silent past the timeout
            raise RankFailure(f"replica {self.rank}: a replica sharing the MoE layers stopped answering: {exc}") from exc
        return int(total.item()) // self.tp_size

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["ReplicaGroup"]
