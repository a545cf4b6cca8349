"""KV-head mapping between tensor-parallel layouts (pure arithmetic) and the per-row
descriptors of a head range."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pdserve.engine.kv_transfer.base import shard_heads
from pdserve.engine.kv_transfer.descriptors import KVRegion, head_descriptors, merge_block_runs
from pdserve.common.kv_compat import rank_agent_name
from pdserve.engine.kv_transfer.heads import HeadCopy, head_copies


def test_rank_agent_names():
    assert rank_agent_name("decode-0", 0) == "decode-0"
    assert rank_agent_name("decode-0", 2) == "decode-0.r2"


@pytest.mark.parametrize("total, src_tp, dst_tp", [(t, s, d) for t in (1, 2, 3, 4, 8)
                                                   for s, d in itertools.product((1, 2, 3, 4, 8), repeat=2)
                                                   if all(t % x == 0 or x % t == 0 for x in (s, d))])
def test_every_destination_head_comes_once_from_a_rank_that_holds_it(total, src_tp, dst_tp):
    filled = {d: [] for d in range(dst_tp)}
    for c in head_copies(total, src_tp, dst_tp):
        src = shard_heads(total, src_tp, c.src_rank)
        dst = shard_heads(total, dst_tp, c.dst_rank)
        heads = [src.start + c.src_first + i for i in range(c.count)]
        assert heads == [dst.start + c.dst_first + i for i in range(c.count)]
        assert all(h in src for h in heads)
        filled[c.dst_rank].extend(heads)
    for d in range(dst_tp):
        assert sorted(filled[d]) == list(shard_heads(total, dst_tp, d))


def test_split_and_replicated_cases():
    assert head_copies(4, 2, 1) == (HeadCopy(0, 0, 0, 0, 2), HeadCopy(1, 0, 0, 2, 2))
    assert head_copies(4, 1, 2) == (HeadCopy(0, 0, 0, 0, 2), HeadCopy(0, 1, 2, 0, 2))
    assert head_copies(4, 2, 2) == (HeadCopy(0, 0, 0, 0, 2), HeadCopy(1, 1, 0, 0, 2))
    # 1 KV head replicated on both source ranks: the two destination ranks take turns
    assert head_copies(1, 2, 2) == (HeadCopy(0, 0, 0, 0, 1), HeadCopy(1, 1, 0, 0, 1))


def test_head_descriptors_cover_the_head_range_of_every_token_row():
    heads, dim, item, bs = 4, 2, 4, 2
    block_bytes = 2 * bs * heads * dim * item
    region = KVRegion(base_addr=1000, num_blocks=5, block_bytes=block_bytes, device_id=0)
    runs = merge_block_runs([1, 2], [0, 1])
    rows = head_descriptors(runs, region, range(1, 2), "local", heads, first=1, count=2, head_bytes=dim * item)
    assert rows.shape == (2 * 2 * bs, 3)
    first_block = 1000 + (1 * 5 + 1) * block_bytes
    expected = [first_block + r * heads * dim * item + 1 * dim * item for r in range(2 * bs)]
    assert rows[: 2 * bs, 0].tolist() == expected
    assert set(rows[:, 1].tolist()) == {2 * dim * item}
    assert np.all(np.diff(rows[:, 0].astype(np.int64)) > 0)
