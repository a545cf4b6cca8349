"""The executor of one rank in the engine's own process (tp = 1).

Owns: its ``RankWorker``, and the ``ReplicaGroup`` of a replica sharing MoE layers with
other replicas (closed with the executor). Lifecycle follows the rank's: built with the
model loaded, ``allocate`` once (a replica's rank then waits until every replica is ready), then
``execute``/``collect`` (or ``idle_step``) per step. The engine
talks to every executor through the same methods, so rank processes (tp > 1)
slot in behind them without the engine changing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pdserve.engine.executor.rank import RankWorker
from pdserve.engine.kv_connector import LayerSender
from pdserve.engine.plan import StepPlan
from pdserve.engine.sampler import PendingSample, SampleResult

if TYPE_CHECKING:
    from pdserve.engine.executor.replica_group import ReplicaGroup


class InProcessExecutor:
    def __init__(self, rank: RankWorker, replicas: ReplicaGroup | None = None):
        self.rank, self.replicas = rank, replicas

    def block_bytes(self) -> int:
        return self.rank.block_bytes()

    def blocks_that_fit(self, memory_fraction: float) -> int:
        return self.rank.blocks_that_fit(memory_fraction)

    @property
    def cache_tokens_per_seq(self) -> int:
        return self.rank.cache_tokens_per_seq

    def allocate(self, num_blocks: int, max_model_len: int) -> None:
        self.rank.allocate(num_blocks, max_model_len)

    def execute(self, plan: StepPlan) -> PendingSample | None:
        return self.rank.execute(plan)

    def idle_step(self) -> bool:
        return self.rank.idle_step()

    def attach_layer_sender(self, sender: LayerSender) -> None:
        self.rank.attach_layer_sender(sender)

    @property
    def supports_overlap(self) -> bool:
        return self.rank.platform.asynchronous

    def close(self) -> None:
        """The rank lives in this process; a replica leaves its group."""
        if self.replicas is not None:
            self.replicas.close()
            self.replicas = None

    def collect(self, pending: PendingSample) -> SampleResult:
        return self.rank.collect(pending)

    def forget_all(self) -> None:
        self.rank.forget_all()

    def synchronize(self) -> None:
        self.rank.synchronize()

    @property
    def device(self) -> torch.device:
        return self.rank.device

    @property
    def kv_cache(self) -> torch.Tensor:
        """This process's KV-cache shard (what its KV transfer agent registers)."""
        return self.rank.kv_cache

    def kv_links(self) -> list:
        return []  # NOTE: the worker builds its agent over ``kv_cache`` itself

    def load_adapter(self, name: str, path: str) -> list[str]:
        return [self.rank.load_adapter(name, path)]

    def unload_adapter(self, name: str) -> None:
        self.rank.unload_adapter(name)

    def local_rank(self) -> RankWorker:
        return self.rank

    def rank_seconds(self) -> list[tuple[float, float]]:
        return []  # NOTE: one rank, no collectives: the engine's step time says it all


__all__ = ["InProcessExecutor"]
