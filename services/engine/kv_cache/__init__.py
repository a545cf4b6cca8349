"""Paged KV cache bookkeeping (CPU side): block pool, prefix cache, per-request block tables.

The tensors themselves live in ``kv_cache.tensor``; the transfer layer registers
those regions. Bookkeeping never touches tensors.
"""
from pdserve.engine.kv_cache.block_pool import BlockPool
from pdserve.engine.kv_cache.manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheManager"]
