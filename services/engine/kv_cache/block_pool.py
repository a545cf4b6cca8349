"""Fixed pool of KV blocks with reference counts, prefix-cache hashes and LRU eviction.

Owns: every block's ref count and hash. Lifecycle of a block:
free (ref 0, no hash) -> allocated (ref >= 1) -> [hash set once full] ->
released (ref 0; kept in the prefix cache if hashed) -> reused by a later hit
(ref >= 1 again) or evicted (hash dropped) when the pool needs a free block.

NOTE: blocks with ref 0 sit in one LRU queue (``_free``); allocation takes the
least recently released first, so cached prefixes survive as long as possible.
"""
from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached_free(self) -> int:
        return sum(1 for b in self._free if self._hash[b] is not None)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (ref 1), evicting cached ones LRU-first; ValueError if too few."""
        if n > len(self._free):
            raise ValueError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._drop_hash(block)
            self._ref[block] = 1
            out.append(block)
        return out

    def lookup(self, block_hash: int) -> int | None:
        return self._by_hash.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks found by ``lookup``."""
        for b in blocks:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference each; the last one returns the block to the LRU queue.

        Callers release a request's blocks tail-first so that the tail of a prefix is
        evicted before its head.
        """
        for b in blocks:
            if self._ref[b] <= 0:
                raise RuntimeError(f"KV block {b} released more often than taken")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None

    def set_hash(self, block: int, block_hash: int) -> None:
        """Record a full block's content hash; the first block with a hash wins."""
        if not self.enable_caching or self._hash[block] is not None:
            return
        if block_hash in self._by_hash:
            return  # same content already cached in another block
        self._hash[block] = block_hash
        self._by_hash[block_hash] = block

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def _drop_hash(self, block: int) -> None:
        h = self._hash[block]
        if h is not None:
            self._hash[block] = None
            if self._by_hash.get(h) == block:
                del self._by_hash[h]

    def reset_cache(self) -> None:
        """Forget every cached prefix of unreferenced blocks."""
        for b in list(self._free):
            self._drop_hash(b)
