"""Rotary position embedding as a layer: owns the cos/sin table (float32, not a weight).

Lifecycle: built empty (models are built on the meta device), ``prepare(device)``
fills the table once the model is on its device; the backend's fused
rotary-then-store op reads it every step.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from pdserve.kernels.reference import build_cos_sin_cache


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: Mapping[str, Any] | None = None):
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.scaling = dict(scaling) if scaling else None
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def prepare(self, device: torch.device) -> None:
        self.cos_sin = build_cos_sin_cache(self.head_dim, self.max_positions, self.theta, self.scaling).to(device)


__all__ = ["RotaryEmbedding"]
