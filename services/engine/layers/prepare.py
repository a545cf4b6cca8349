"""The one pass after loading that puts a model's weights in its backend's form.

Owns: ``prepare_weights`` (every linear layer, every embedding / LM head and every
sparse MLP's experts of a model asked once, after its weights are loaded and before its
first forward, to hand its tensors to ``Backend.prepare_linear_weight`` /
``prepare_expert_weights`` / the quantized method's own packing).
Nothing is prepared twice: a prepared weight is no longer a checkpoint tensor.
"""
from __future__ import annotations

from torch import nn

from pdserve.engine.backends.base import Backend
from pdserve.engine.layers.embedding import VocabParallelEmbedding
from pdserve.engine.layers.linear import LinearBase
from pdserve.engine.layers.moe import FusedMoE


def prepare_weights(model: nn.Module, be: Backend) -> None:
    """``prepare_weights(be)`` of each linear, vocabulary and expert layer of ``model``."""
    for module in model.modules():
        if isinstance(module, (LinearBase, VocabParallelEmbedding, FusedMoE)):
            module.prepare_weights(be)


__all__ = ["prepare_weights"]
