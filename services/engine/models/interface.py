"""What the engine needs of a model class (``CausalLM``), whatever its architecture.

Owns the protocol only. A model is built from ``pdserve.engine.layers`` with a
``LayerContext``, on the meta device, then materialised; it holds weights and no
per-request state (the KV cache shard is passed in each step).
"""
from __future__ import annotations

from typing import Callable, Iterable, Protocol

import torch

from pdserve.engine.backends.base import AttentionMetadata, Backend
from pdserve.engine.layers import LayerContext
from pdserve.engine.models.model_config import ModelConfig

LayerHook = Callable[[int], None]


class CausalLM(Protocol):
    config: ModelConfig

    def __init__(self, cfg: ModelConfig, ctx: LayerContext) -> None: ...

    def kv_heads_per_rank(self) -> int:
        """KV heads this rank's cache shard holds per layer."""

    def prepare(self, device: torch.device) -> None:
        """Fill non-weight tables (rotary) once the weights are on ``device``."""

    def fuse_layers(self, be: Backend) -> bool:
        """Once, after the weights are prepared for ``be``: use its fused decoder layers where
        the model's layers allow (True if it does)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, be: Backend, on_layer_done: LayerHook | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm; ``kv_cache`` is [L, N, 2, bs, Hkv, D]."""

    def compute_logits(self, hidden: torch.Tensor, be: Backend) -> torch.Tensor:
        """float32 logits [rows, vocab]."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (checkpoint name, whole tensor) pairs, each layer keeping its rank's slice."""

    def parameters(self) -> Iterable[torch.nn.Parameter]: ...
