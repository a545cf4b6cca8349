"""Block-id lists -> merged byte regions for one KV transfer.

Owns: the pure arithmetic between "copy local blocks [3, 4, 5, 9] into remote
blocks [10, 11, 12, 40]" and the (addr, len, device_id) descriptors a transport
moves. No transport, no torch: numpy only, so it is cheap to unit-test.

Lifecycle of one transfer's descriptors:
  1. ``merge_block_runs`` pairs the two id lists into ``BlockRun``s: maximal runs
     where both sides advance by one block at a time.
  2. ``check_block_ids`` bounds-checks each side against its own ``num_blocks``
     (peers may have caches of different sizes).
  3. ``run_descriptors`` turns the runs into one (addr, len, dev) row per run per
     layer, for ``initialize_xfer``-style transports; ``run_indices`` expands them
     into per-(layer, block) indices for transports that pre-register one
     descriptor per (layer, block) and merge adjacent entries themselves;
     ``head_descriptors`` gives one row per token row for a head range that is
     not a whole shard (peers of different tp, ``heads.py``).

The KV tensor is ``[num_layers, num_blocks, 2, block_size, heads, head_dim]``, so
(layer l, block b) starts at ``((l * num_blocks) + b) * block_bytes`` and a run of
adjacent block ids within one layer is one contiguous region.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

Side = Literal["local", "remote"]


@dataclass(frozen=True)
class BlockRun:
    """``length`` blocks copied from ``local_start..`` to ``remote_start..``."""

    local_start: int
    remote_start: int
    length: int


@dataclass(frozen=True)
class KVRegion:
    """Where one worker's KV tensor lives: enough to address any (layer, block)."""

    base_addr: int
    num_blocks: int
    block_bytes: int
    device_id: int


def merge_block_runs(local_ids: Sequence[int], remote_ids: Sequence[int]) -> tuple[BlockRun, ...]:
    """Pair two block-id lists into the fewest runs that are contiguous on both sides.

    A run is split wherever either side stops advancing by exactly one, so every
    local run maps onto a remote run of equal length.

    Args:
        local_ids: source block ids, in transfer order.
        remote_ids: destination block ids, same length; ``remote_ids[i]`` receives
            ``local_ids[i]``.

    Returns:
        The runs, in the order of the input lists. Empty input gives ``()``.

    Raises:
        ValueError: lengths differ, an id is negative or not an integer, or a
            remote id repeats (a destination block would be written twice).
    """
    local = _as_ids(local_ids, "local")
    remote = _as_ids(remote_ids, "remote")
    if local.shape != remote.shape:
        raise ValueError(f"block id lists differ in length: local {local.size} != remote {remote.size}")
    if local.size == 0:
        return ()
    if np.unique(remote).size != remote.size:
        raise ValueError(f"remote block ids repeat: {_first_duplicate(remote)} appears more than once")
    breaks = np.flatnonzero((np.diff(local) != 1) | (np.diff(remote) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [local.size]))
    return tuple(map(BlockRun, local[starts].tolist(), remote[starts].tolist(), (ends - starts).tolist()))


def check_block_ids(runs: Sequence[BlockRun], num_blocks: int, side: Side) -> None:
    """Raise ValueError if any block of ``runs`` on ``side`` is >= ``num_blocks``."""
    for run in runs:
        start = run.local_start if side == "local" else run.remote_start
        if start + run.length > num_blocks:
            bad = max(start, num_blocks)
            raise ValueError(f"{side} block id {bad} out of range: the {side} cache has {num_blocks} blocks")


def run_descriptors(runs: Sequence[BlockRun], region: KVRegion, layers: range, side: Side) -> np.ndarray:
    """One (addr, len, device_id) row per run per layer, layer-major.

    Returns:
        ``uint64`` array of shape ``(len(layers) * len(runs), 3)``.
    """
    starts, lengths = _side_arrays(runs, side)
    layer_ids = np.asarray(layers, dtype=np.uint64)[:, None]
    blocks = layer_ids * np.uint64(region.num_blocks) + starts[None, :]
    addrs = np.uint64(region.base_addr) + blocks * np.uint64(region.block_bytes)
    lens = np.broadcast_to(lengths * np.uint64(region.block_bytes), addrs.shape)
    devs = np.full(addrs.shape, region.device_id, dtype=np.uint64)
    return np.stack([addrs.ravel(), lens.ravel(), devs.ravel()], axis=1)


def head_descriptors(runs: Sequence[BlockRun], region: KVRegion, layers: range, side: Side, row_heads: int,
                     first: int, count: int, head_bytes: int) -> np.ndarray:
    """One (addr, len, device_id) row per (layer, block, K/V, token) for ``count`` heads
    from head ``first`` of a shard whose token rows hold ``row_heads`` heads.

    A head range that is not the whole shard is strided in the token-major block
    layout, so each token row is its own region.

    Returns:
        ``uint64`` array of shape ``(len(layers) * sum(run.length) * rows_per_block, 3)``.
    """
    row_bytes = row_heads * head_bytes
    rows = region.block_bytes // row_bytes  # 2 * block_size
    starts, lengths = _side_arrays(runs, side)
    blocks = np.concatenate([np.arange(s, s + n, dtype=np.uint64) for s, n in zip(starts, lengths)]
                            or [np.zeros(0, np.uint64)])
    layer_ids = np.asarray(layers, dtype=np.uint64)[:, None]
    block_addrs = np.uint64(region.base_addr) + (layer_ids * np.uint64(region.num_blocks) + blocks[None, :]) \
        * np.uint64(region.block_bytes)
    inner = np.arange(rows, dtype=np.uint64) * np.uint64(row_bytes) + np.uint64(first * head_bytes)
    addrs = (block_addrs[:, :, None] + inner[None, None, :]).ravel()
    lens = np.full(addrs.shape, count * head_bytes, dtype=np.uint64)
    devs = np.full(addrs.shape, region.device_id, dtype=np.uint64)
    return np.stack([addrs, lens, devs], axis=1)


def run_indices(runs: Sequence[BlockRun], num_blocks: int, layers: range, side: Side) -> np.ndarray:
    """Per-(layer, block) indices ``layer * num_blocks + block``, layer-major.

    For a descriptor list prepared with one entry per (layer, block), in the
    order ``all_block_descriptors`` produces.

    Returns:
        ``int32`` array of ``len(layers) * sum(run.length)`` indices.
    """
    starts, lengths = _side_arrays(runs, side)
    if starts.size == 0 or len(layers) == 0:
        return np.zeros(0, dtype=np.int32)
    offsets = np.arange(int(lengths.sum()), dtype=np.int64)
    run_of = np.repeat(np.arange(starts.size), lengths.astype(np.int64))
    first = np.concatenate(([0], np.cumsum(lengths.astype(np.int64))[:-1]))
    blocks = starts.astype(np.int64)[run_of] + offsets - first[run_of]
    layer_ids = np.asarray(layers, dtype=np.int64)[:, None]
    return (layer_ids * num_blocks + blocks[None, :]).ravel().astype(np.int32)


def all_block_descriptors(region: KVRegion, num_layers: int) -> np.ndarray:
    """One (addr, len, device_id) row per (layer, block): the list to prepare once."""
    count = num_layers * region.num_blocks
    addrs = np.uint64(region.base_addr) + np.arange(count, dtype=np.uint64) * np.uint64(region.block_bytes)
    lens = np.full(count, region.block_bytes, dtype=np.uint64)
    devs = np.full(count, region.device_id, dtype=np.uint64)
    return np.stack([addrs, lens, devs], axis=1)


def _as_ids(ids: Sequence[int], side: Side) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{side} block ids must be a flat list of integers, got dtype {arr.dtype} shape {arr.shape}")
    if int(arr.min()) < 0:
        raise ValueError(f"{side} block id {int(arr.min())} is negative")
    return arr.astype(np.int64)


def _side_arrays(runs: Sequence[BlockRun], side: Side) -> tuple[np.ndarray, np.ndarray]:
    starts = [r.local_start if side == "local" else r.remote_start for r in runs]
    return np.asarray(starts, dtype=np.uint64), np.asarray([r.length for r in runs], dtype=np.uint64)


def _first_duplicate(ids: np.ndarray) -> int:
    values, counts = np.unique(ids, return_counts=True)
    return int(values[counts > 1][0])


def checked_layers(layers: range | None, num_layers: int) -> range:
    """The layers a write covers (all when None); ValueError when out of range."""
    if layers is None:
        return range(num_layers)
    if not isinstance(layers, range):
        raise ValueError(f"layers must be a range or None, got {type(layers).__name__}")
    if len(layers) and (min(layers) < 0 or max(layers) >= num_layers):
        raise ValueError(f"layers {layers} out of range: the cache has {num_layers} layers")
    return layers
