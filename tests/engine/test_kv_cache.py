"""Block pool and KV cache manager: ref counts, prefix hits, LRU eviction, no leaks."""
import pytest

from pdserve.engine.kv_cache import BlockPool, KVCacheManager


def test_pool_allocate_release_refcounts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free == 1 and all(pool.ref_count(b) == 1 for b in a)
    pool.touch(a[:1])
    pool.release(a)
    assert pool.num_free == 3 and pool.ref_count(a[0]) == 1
    pool.release(a[:1])
    assert pool.num_free == 4
    with pytest.raises(RuntimeError):
        pool.release(a[:1])
    with pytest.raises(ValueError):
        pool.allocate(5)


def test_prefix_hit_and_partial_last_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    toks = list(range(10))
    assert kv.match_prefix("a", toks) == 0
    assert kv.allocate_slots("a", 10)
    assert len(kv.blocks_of("a")) == 3
    kv.commit_full_blocks("a", toks, 10)
    kv.free("a")
    assert kv.stats() == {"free": 8, "used": 0, "cached": 2, "total": 8}
    # same prompt: two full blocks hit; the partial third is recomputed
    assert kv.match_prefix("b", toks) == 8
    # a prompt of exactly 8 tokens may hit only the first block (the last token must be computed)
    assert kv.match_prefix("c", toks[:8]) == 4
    kv.free("b"), kv.free("c")
    assert kv.stats()["used"] == 0


def test_different_prefix_does_not_hit():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.match_prefix("a", list(range(9)))
    kv.allocate_slots("a", 9)
    kv.commit_full_blocks("a", list(range(9)), 9)
    kv.free("a")
    assert kv.match_prefix("b", [99] + list(range(1, 9))) == 0
    # the hash chains: same second block after a different first block is no hit
    kv.free("b")


def test_lru_eviction_prefers_oldest_and_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    for rid, toks in (("a", [1, 2, 3, 4, 5]), ("b", [7, 8, 9, 10, 11])):
        kv.match_prefix(rid, toks)
        assert kv.allocate_slots(rid, 4)
        kv.commit_full_blocks(rid, toks, 4)
        kv.free(rid)
    assert kv.stats()["cached"] == 4
    assert kv.allocate_slots("c", 2)  # evicts one block: a's tail (released first, tail-first)
    assert kv.match_prefix("a2", [1, 2, 3, 4, 5]) == 2
    assert kv.match_prefix("b2", [7, 8, 9, 10, 11]) == 4
    for rid in ("c", "a2", "b2"):
        kv.free(rid)
    assert kv.stats()["used"] == 0


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    assert not kv.allocate_slots("a", 12)
    assert kv.stats()["free"] == 2 and kv.blocks_of("a") == []


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    kv.match_prefix("a", [1, 2, 3])
    kv.allocate_slots("a", 3)
    kv.commit_full_blocks("a", [1, 2, 3], 3)
    kv.free("a")
    assert kv.match_prefix("b", [1, 2, 3]) == 0
    assert kv.stats()["cached"] == 0


def test_allocation_hands_out_contiguous_runs():
    pool = BlockPool(16)
    a = pool.allocate(3)
    b = pool.allocate(4)
    assert a == [0, 1, 2] and b == [3, 4, 5, 6]
    pool.release(a)  # a hole of 3 at the front
    c = pool.allocate(5)  # does not fit the hole: the first run long enough
    assert c == [7, 8, 9, 10, 11]
    d = pool.allocate(2)  # fits the hole
    assert d == [0, 1]
    assert pool.allocate(1, after=11) == [12]  # a growing table continues its run
    e = pool.allocate(4)  # no run of 4 left: the lowest ids
    assert e == [2, 13, 14, 15]
    assert pool.num_free == 0


def test_growing_tables_stay_contiguous():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    for rid in ("a", "b"):
        kv.match_prefix(rid, list(range(9)))
        assert kv.allocate_slots(rid, 9)
    for n in range(10, 40):  # both grow token by token, interleaved
        for rid in ("a", "b"):
            assert kv.allocate_slots(rid, n)
    for rid in ("a", "b"):
        blocks = kv.blocks_of(rid)
        runs = 1 + sum(1 for x, y in zip(blocks, blocks[1:]) if y != x + 1)
        assert runs <= 4, (rid, blocks)
        kv.free(rid)
    assert kv.stats()["used"] == 0


def test_empty_blocks_are_used_before_cached_ones_are_evicted():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    kv.match_prefix("a", [1, 2, 3, 4, 5])
    assert kv.allocate_slots("a", 4)
    kv.commit_full_blocks("a", [1, 2, 3, 4, 5], 4)
    kv.free("a")
    assert kv.stats()["cached"] == 2
    kv.match_prefix("b", list(range(20, 33)))
    assert kv.allocate_slots("b", 12)  # the 6 empty blocks: no eviction
    assert kv.stats()["cached"] == 2
    kv.free("b")
    assert kv.match_prefix("a2", [1, 2, 3, 4, 5]) == 4
    kv.free("a2")
    assert kv.stats()["used"] == 0


def test_random_allocation_never_hands_out_a_block_twice():
    import random

    rng = random.Random(3)
    pool = BlockPool(64)
    tables: dict[int, list[int]] = {}
    for step in range(3000):
        rid = rng.randrange(12)
        table = tables.setdefault(rid, [])
        if table and rng.random() < 0.2:
            pool.release(list(reversed(table)))
            tables[rid] = []
        else:
            n = rng.randrange(1, 6)
            if n <= pool.num_free:
                table += pool.allocate(n, after=table[-1] if table else None)
        held = [b for t in tables.values() for b in t]
        assert len(held) == len(set(held)) and pool.num_free == 64 - len(held), step
