"""The interface the engine drives, whatever runs its ranks (``Executor``).

Owns the protocol only. Lifecycle of every executor: built with its ranks' models
loaded -> ``block_bytes`` / ``blocks_that_fit`` size the cache -> ``allocate`` once
-> ``execute(plan)`` then ``collect`` per step -> ``close``.
"""
from __future__ import annotations

from typing import Any, Protocol

from pdserve.engine.kv_connector import LayerSender
from pdserve.engine.plan import StepPlan
from pdserve.engine.sampler import SampleResult


class Executor(Protocol):
    def block_bytes(self) -> int:
        """Bytes of one KV block on one rank."""

    def blocks_that_fit(self, memory_fraction: float) -> int:
        """KV blocks every rank can hold in ``memory_fraction`` of its free memory."""

    @property
    def cache_tokens_per_seq(self) -> int: ...

    def allocate(self, num_blocks: int, max_model_len: int) -> None: ...

    def execute(self, plan: StepPlan) -> Any:
        """Launch the step; a handle for ``collect`` when a row samples, else None."""

    def idle_step(self) -> bool:
        """A step with nothing to run here: a replica whose MoE layers other replicas share joins
        theirs; returns whether any replica ran a step (always False without such replicas)."""

    def collect(self, pending: Any) -> SampleResult:
        """The sampled tokens of a launched step (waits for them)."""

    def forget_all(self) -> None: ...

    def synchronize(self) -> None: ...

    def attach_layer_sender(self, sender: LayerSender) -> None: ...

    def kv_links(self) -> list[Any]:
        """Each rank process's KV command/event pipe; empty when the rank runs in this process."""

    def load_adapter(self, name: str, path: str) -> list[str]:
        """Load a LoRA adapter on every rank; per rank "" or why it was refused."""

    def unload_adapter(self, name: str) -> None:
        """Free a LoRA adapter's slot on every rank that has it."""

    def rank_seconds(self) -> list[tuple[float, float]]:
        """Per rank process: (seconds in steps, of which in collectives); empty for one in-process rank."""

    def local_rank(self) -> Any:
        """The ``RankWorker`` running in this process (benchmarks look inside it); ValueError when
        the ranks run in processes of their own."""

    @property
    def supports_overlap(self) -> bool:
        """Whether a step may be launched before the previous one's tokens are read."""

    def close(self) -> None: ...


__all__ = ["Executor"]
