"""The model registry: architecture name -> model class, and what can be served.

Owns: the table from a checkpoint's ``architectures[0]`` to the class that builds
it (by module path, imported only when asked for, so parsing a config needs no
torch) and the checks that refuse what no model class can serve (an unknown
architecture, a quantization method without a kernel), each with a message
naming what is supported. The loader, the runner and the graphs reach model
classes only through ``model_class``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.engine.models.interface import CausalLM

# architecture -> "module:Class"
_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "pdserve.engine.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "pdserve.engine.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "pdserve.engine.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "pdserve.engine.models.llama:LlamaForCausalLM",
    "MixtralForCausalLM": "pdserve.engine.models.moe:MoeForCausalLM",
    "Qwen2MoeForCausalLM": "pdserve.engine.models.moe:MoeForCausalLM",
    "Qwen3MoeForCausalLM": "pdserve.engine.models.moe:MoeForCausalLM",
}
_QUANTIZATIONS: tuple[str, ...] = ()  # quantization methods with a linear method


class UnsupportedModelError(ValueError):
    """The model's architecture or weight format is not supported."""


def supported_architectures() -> tuple[str, ...]:
    return tuple(_MODELS)


def check_architecture(arch: str) -> None:
    if arch not in _MODELS:
        raise UnsupportedModelError(f"unsupported architecture {arch!r}; supported: {', '.join(_MODELS)}")


def check_quantization(quantization: Any) -> None:
    """Refuse a quantized checkpoint whose method has no linear method here."""
    if quantization is not None and quantization.method not in _QUANTIZATIONS:
        supported = ", ".join(_QUANTIZATIONS) or "none yet"
        raise UnsupportedModelError(
            f"the checkpoint is quantized with {quantization.method!r}, which pdserve cannot load "
            f"(supported quantization methods: {supported}); use the unquantized weights")


def model_class(arch: str) -> "type[CausalLM]":
    check_architecture(arch)
    module, cls = _MODELS[arch].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["UnsupportedModelError", "check_architecture", "check_quantization", "model_class",
           "supported_architectures"]
