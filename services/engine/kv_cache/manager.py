"""Per-request KV block tables on top of the block pool.

Owns: the mapping request id -> block list, the chained block hashes of each
request's tokens, and prefix-cache matching. Lifecycle per request:
``match_prefix`` (on admission) -> ``allocate_slots`` (each step, for the tokens
about to be computed) -> ``commit_full_blocks`` (after the step: hash the newly
full blocks) -> ``free`` (finish, abort or preemption).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.kv_cache.block_pool import BlockPool


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


def _root(salt: str) -> int | None:
    """The parent of a chain's first block: None for the base model, else the salt's hash."""
    return hash(("salt", salt)) if salt else None


@dataclass
class _Table:
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # of the first len(hashes) full blocks
    salt: str = ""


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self._tables: dict[str, _Table] = {}

    def blocks_of(self, req_id: str) -> list[int]:
        return self._tables[req_id].blocks if req_id in self._tables else []

    def has(self, req_id: str) -> bool:
        return req_id in self._tables

    def match_prefix(self, req_id: str, token_ids: list[int], salt: str = "") -> int:
        """Adopt cached blocks for the longest cached prefix; returns tokens covered.

        ``salt`` starts the hash chain (a LoRA adapter's name): blocks computed under
        one salt never serve another.

        NOTE: at least one token is always left to compute (the last one produces
        the logits), so a prefix that covers the whole prompt stops one block short.
        """
        table = self._tables.setdefault(req_id, _Table())
        if table.blocks:
            return 0
        table.salt = salt
        bs, hits, parent = self.block_size, [], _root(salt)
        hashes: list[int] = []
        for i in range((len(token_ids) - 1) // bs):
            h = chain_hash(parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
            hashes.append(h)
            parent = h
        self.pool.touch(hits)
        table.blocks, table.hashes = hits, hashes
        return len(hits) * bs

    def blocks_needed(self, req_id: str, num_tokens: int) -> int:
        have = len(self.blocks_of(req_id))
        return max(0, -(-num_tokens // self.block_size) - have)

    def allocate_slots(self, req_id: str, num_tokens: int) -> bool:
        """Ensure blocks for the first num_tokens tokens; False (no change) if the pool is short."""
        need = self.blocks_needed(req_id, num_tokens)
        if need > self.pool.num_free:
            return False
        table = self._tables.setdefault(req_id, _Table())
        if need:
            table.blocks.extend(self.pool.allocate(need, after=table.blocks[-1] if table.blocks else None))
        return True

    def commit_full_blocks(self, req_id: str, token_ids: list[int], num_computed: int) -> None:
        """Hash the blocks that are now completely computed, making them reusable."""
        table = self._tables.get(req_id)
        if table is None or not self.pool.enable_caching:
            return
        bs = self.block_size
        parent = table.hashes[-1] if table.hashes else _root(table.salt)
        for i in range(len(table.hashes), min(num_computed // bs, len(table.blocks))):
            parent = chain_hash(parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            table.hashes.append(parent)
            self.pool.set_hash(table.blocks[i], parent)

    def free(self, req_id: str) -> None:
        table = self._tables.pop(req_id, None)
        if table is not None:
            self.pool.release(list(reversed(table.blocks)))

    def stats(self) -> dict[str, int]:
        free = self.pool.num_free
        return {"free": free, "used": self.pool.num_blocks - free, "cached": self.pool.num_cached_free,
                "total": self.pool.num_blocks}
