"""Compute backends: the fused ops and paged attention a model forward needs.

``base.Backend`` is the interface; ``torch_backend`` is the reference (CPU and any
device), ``cpu_backend`` adds pdserve's compiled CPU kernels, ``triton_backend``
is the CUDA one. A platform (``pdserve.engine.platforms``) makes its backend.
"""
from pdserve.engine.backends.base import AttentionMetadata, Backend

__all__ = ["AttentionMetadata", "Backend"]
