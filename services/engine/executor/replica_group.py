"""The data-parallel replicas that share MoE layers (ep = dp, tp = 1): their process group and lockstep.

Owns: the gloo process group of the ``dp`` replica engines of one worker (rank =
the replica's ``dp_rank``, meeting on 127.0.0.1:``port``), the communicator the
MoE layers gather tokens over, and the step handshake that keeps the replicas in
lockstep: every MoE layer is a collective, so when any replica runs a step, every
replica runs one, those without tokens joining the MoE layers only.

Lifecycle: ``ReplicaGroup(...)`` joins (blocks until every replica has) ->
``wait_for_all(timeout)`` once the engine is ready (replicas load at different
speeds; the step collectives then time out after ``timeout`` seconds only) -> per
step ``sync(num_tokens)``, the first collective of every step of every replica ->
``close()``.

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
        timeout: seconds a collective may wait for a silent replica (the rank timeout).
    """

    def __init__(self, rank: int, size: int, port: int, timeout: float):
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a process group; a replica sharing MoE "
                               "layers runs its engine in a process of its own")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout))
        self.rank, self.size = rank, size
        self.comm = ProcessGroupComm()

    def wait_for_all(self, timeout: float) -> None:
        """Return once every replica is ready to step (RuntimeError naming the missing ones)."""
        dist.monitored_barrier(timeout=timedelta(seconds=timeout), wait_all_ranks=True)

    def sync(self, num_tokens: int) -> int:
        """The tokens all replicas compute this step (0: every replica is idle)."""
        total = torch.tensor([num_tokens], dtype=torch.int64)
        try:
            dist.all_reduce(total)
        except RuntimeError as exc:  # NOTE: gloo's error when a peer is gone or silent past the timeout
            raise RankFailure(f"replica {self.rank}: a replica sharing the MoE layers stopped answering: {exc}") from exc
        return int(total.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["ReplicaGroup"]
