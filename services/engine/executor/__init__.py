"""Between the engine and the model: the ranks that execute each step's plan.

Owns: ``RankWorker`` (``rank``: one rank's model slice, KV-cache shard, graphs and
sampler, and the request state a plan builds up on it), the executors the engine
drives (``base.Executor``; ``in_process``: one rank in the engine's process;
``multiproc``: a process per rank of a tensor-parallel group) and the group's
collectives (``collectives``). The engine sends a ``StepPlan`` and
gets back sampled tokens; it never touches a rank's tensors.
"""
from pdserve.engine.executor.base import Executor
from pdserve.engine.executor.in_process import InProcessExecutor
from pdserve.engine.executor.multiproc import MultiprocExecutor, RankFailure
from pdserve.engine.executor.rank import RankConfig, RankWorker

__all__ = ["Executor", "InProcessExecutor", "MultiprocExecutor", "RankConfig", "RankFailure", "RankWorker"]
