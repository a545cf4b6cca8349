"""Compute backends: the fused ops and paged attention a model forward needs.

``base.Backend`` is the interface; ``torch_backend`` is the reference (CPU and any
device), ``triton_backend`` the CUDA one. ``select_backend`` picks by device type.
"""
from pdserve.engine.backends.base import AttentionMetadata, Backend
from pdserve.engine.backends.select import select_backend

__all__ = ["AttentionMetadata", "Backend", "select_backend"]
