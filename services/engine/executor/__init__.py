"""Between the engine and the model: the ranks that execute each step's plan.

Owns: ``RankWorker`` (``rank``: one rank's model slice, KV-cache shard, graphs and
sampler, and the request state a plan builds up on it), the executors the engine
drives (``in_process``: one rank in the engine's process) and the collectives of
a tensor-parallel group (``collectives``). The engine sends a ``StepPlan`` and
gets back sampled tokens; it never touches a rank's tensors.
"""
from pdserve.engine.executor.in_process import InProcessExecutor
from pdserve.engine.executor.rank import RankConfig, RankWorker

__all__ = ["InProcessExecutor", "RankConfig", "RankWorker"]
