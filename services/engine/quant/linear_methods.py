"""The choice of linear method per layer, for one model's checkpoint.

Owns: ``QuantizedLinears``, the object a ``LayerContext`` carries as ``quantization``
when the checkpoint is quantized; each linear layer asks it, with the checkpoint
module names it holds, which method stores its weights (None: unquantized). Built
once per rank at model construction (``for_checkpoint``) from the model's
``QuantizationConfig``.
"""
from __future__ import annotations

from typing import Any

from pdserve.engine.layers import LinearMethod
from pdserve.engine.quant.scheme import W8A8Scheme, parse_scheme
from pdserve.engine.quant.w8a8 import W8A8LinearMethod


class QuantizedLinears:
    def __init__(self, scheme: W8A8Scheme):
        self.scheme = scheme

    @property
    def name(self) -> str:
        return self.scheme.name

    def for_layer(self, modules: tuple[str, ...]) -> LinearMethod | None:
        """The method of a layer holding the checkpoint modules ``modules``."""
        return W8A8LinearMethod() if self.scheme.covers(modules) else None


def for_checkpoint(quantization: Any) -> QuantizedLinears | None:
    """The per-layer choice for a ``ModelConfig.quantization`` (None: unquantized)."""
    if quantization is None:
        return None
    return QuantizedLinears(parse_scheme(quantization.method, quantization.raw))


__all__ = ["QuantizedLinears", "for_checkpoint"]
