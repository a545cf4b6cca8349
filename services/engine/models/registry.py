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

from pdserve.engine.quant.scheme import UnsupportedQuantizationError, parse_scheme

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


class UnsupportedModelError(ValueError):
    """The model's architecture or weight format is not supported."""


def supported_architectures() -> tuple[str, ...]:
    return tuple(_MODELS)


def check_architecture(arch: str) -> None:
    if arch not in _MODELS:
        raise UnsupportedModelError(f"unsupported architecture {arch!r}; supported: {', '.join(_MODELS)}")


def check_quantization(cfg: Any) -> str | None:
    """The name of the quantization scheme of ``cfg`` (a ``ModelConfig``), None when
    unquantized; UnsupportedModelError for one no linear method here runs."""
    q = cfg.quantization
    if q is None:
        return None
    try:
        scheme = parse_scheme(q.method, q.raw)
    except UnsupportedQuantizationError as exc:
        raise UnsupportedModelError(str(exc)) from None
    if cfg.num_experts:
        raise UnsupportedModelError(f"{scheme.name} mixture-of-experts checkpoints are not supported yet "
                                    "(the fused MoE kernels take 16-bit or float32 experts)")
    if not cfg.tie_word_embeddings and scheme.is_quantized("lm_head"):
        raise UnsupportedModelError(f"{scheme.name}: a quantized lm_head is not supported; "
                                    "quantize with lm_head in `ignore`")
    return scheme.name


def model_class(arch: str) -> "type[CausalLM]":
    check_architecture(arch)
    module, cls = _MODELS[arch].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["UnsupportedModelError", "check_architecture", "check_quantization", "model_class",
           "supported_architectures"]
