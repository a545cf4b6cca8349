"""pdserve engine core: model, paged KV cache, scheduler, sampler, runner.

Layering: imports ``kernels`` and ``services.common`` only; never grpc or etcd.
Public API: ``LLM`` and ``SamplingParams`` (offline), ``LLMEngine`` and
``EngineConfig`` (for the worker process).
"""
from services.common.sampling_params import SamplingParams
from services.engine.config import EngineConfig


def __getattr__(name: str):
    # Lazy, so importing the config does not load torch.
    if name == "LLM":
        from services.engine.llm import LLM
        return LLM
    if name == "LLMEngine":
        from services.engine.engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams"]
