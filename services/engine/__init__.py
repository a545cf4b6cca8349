"""pdserve engine core: model, paged KV cache, scheduler, sampler, runner.

Layering: imports ``pdserve.kernels`` and ``pdserve.common`` only; never grpc or etcd.
Public API: ``LLM`` and ``SamplingParams`` (offline), ``LLMEngine`` and
``EngineConfig`` (for the worker process).
"""
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.config import EngineConfig


def __getattr__(name: str):
    # Lazy, so importing the config does not load torch.
    if name == "LLM":
        from pdserve.engine.llm import LLM
        return LLM
    if name == "LLMEngine":
        from pdserve.engine.engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams"]
