"""Mapping KV heads between two workers that split them over different numbers of ranks.

Owns the arithmetic of a transfer between tensor-parallel layouts: which source
rank sends which of its heads to which destination rank (``head_copies``), and
``write_to_worker``, which posts one agent's share of a transfer to every rank
of a peer worker (ranks named by ``pdserve.common.kv_compat.rank_agent_name``).
Nothing here holds state.

Every destination rank receives each head it holds exactly once; a head the
source replicates on several ranks is taken from the replica ``dst_rank % n``,
so replicas share the sending.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

from pdserve.common.kv_compat import rank_agent_name
from pdserve.engine.kv_transfer.base import KVLayout, KVTransferAgent, TransferHandle, shard_heads


@dataclass(frozen=True)
class HeadCopy:
    """``count`` heads from ``src_first..`` of source rank ``src_rank``'s shard into
    ``dst_first..`` of destination rank ``dst_rank``'s shard."""

    src_rank: int
    dst_rank: int
    src_first: int
    dst_first: int
    count: int


@functools.lru_cache(maxsize=64)  # NOTE: asked again for every layer a job posts
def head_copies(total_heads: int, src_tp: int, dst_tp: int) -> tuple[HeadCopy, ...]:
    """The copies that fill every destination rank's shard from the source's shards."""
    copies: list[HeadCopy] = []
    for dst in range(dst_tp):
        wanted = shard_heads(total_heads, dst_tp, dst)
        for head in wanted:
            holders = [r for r in range(src_tp) if head in shard_heads(total_heads, src_tp, r)]
            src = holders[dst % len(holders)]
            src_first = head - shard_heads(total_heads, src_tp, src).start
            last = copies[-1] if copies else None
            if (last is not None and last.dst_rank == dst and last.src_rank == src
                    and last.src_first + last.count == src_first):
                copies[-1] = HeadCopy(src, dst, last.src_first, last.dst_first, last.count + 1)
            else:
                copies.append(HeadCopy(src, dst, src_first, head - wanted.start, 1))
    return tuple(copies)


def is_whole(copy: HeadCopy, src: KVLayout, dst: KVLayout) -> bool:
    """Whether the copy moves whole blocks (both shards hold exactly these heads)."""
    return copy.count == src.num_kv_heads == dst.num_kv_heads


def write_to_worker(agent: KVTransferAgent, worker: str, local_block_ids: Sequence[int],
                    remote_block_ids: Sequence[int], layers: range | None = None) -> list[TransferHandle]:
    """Post this agent's share of writing blocks into every rank of ``worker`` (whose
    rank agents must be loaded); one write per destination rank it feeds."""
    mine = agent.layout
    theirs = agent.peer_layout(worker)
    return [agent.write_blocks(rank_agent_name(worker, c.dst_rank), local_block_ids, remote_block_ids, layers,
                               heads=c)
            for c in head_copies(mine.total_kv_heads, mine.tp_size, theirs.tp_size) if c.src_rank == mine.tp_rank]


__all__ = ["HeadCopy", "head_copies", "is_whole", "rank_agent_name", "write_to_worker"]
