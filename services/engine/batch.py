"""One step's inputs as arrays: built on the host, consumed by the runner and the graphs.

Owns: ``HostBatch`` (a step's token ids, positions, KV slots, query offsets,
context lengths, block tables and logits rows, as numpy arrays, padded to a
graph's batch size when asked), ``build_host_batch`` (vectorised over
sequences) and ``DeviceFeed`` (input tokens that exist only on the device: the
tokens sampled by the step still running). Plain data; no torch state.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pdserve.engine.plan import PlannedRow


@dataclass(frozen=True)
class DeviceFeed:
    """Input tokens that are on the device only: ``input[dst[k]] = tokens[src[k]]``
    (rows of this step's tokens; rows of the sampled tokens of the step before)."""
    tokens: torch.Tensor
    dst: np.ndarray
    src: np.ndarray

    def apply(self, target: torch.Tensor, upload: Callable[[np.ndarray], torch.Tensor]) -> None:
        n = len(self.dst)
        if n == len(self.tokens) and np.array_equal(self.dst, np.arange(n)) and np.array_equal(self.src, self.dst):
            target[:n].copy_(self.tokens)  # NOTE: the usual decode step: same rows, same order
            return
        target.index_copy_(0, upload(self.dst), self.tokens.index_select(0, upload(self.src)))


@dataclass(frozen=True)
class HostBatch:
    """One step's inputs on the host; rows past the scheduled sequences are padding.

    A padding row is a one-token sequence at position 0 whose KV is not stored
    (slot -1) and whose attention reads block 0 (any finite data).
    """
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B+1] int32
    seq_lens: np.ndarray  # [B] int32
    block_tables: np.ndarray  # [B, W] int32, zero-padded
    logits_rows: np.ndarray  # [S] int64: the last row of each sampling sequence

    @property
    def num_rows(self) -> int:
        return len(self.seq_lens)


def build_host_batch(seqs: tuple[PlannedRow, ...], tables: list[list[int]], block_size: int,
                     pad_to: int = 0) -> HostBatch:
    """Vectorised over sequences: the per-token loops run in numpy, not Python."""
    n = len(seqs)
    rows = max(pad_to, n)
    starts = np.fromiter((s.start for s in seqs), np.int64, n)
    counts = np.fromiter((s.num_new for s in seqs), np.int64, n)
    total = int(counts.sum())
    qsl = np.zeros(rows + 1, np.int64)
    np.cumsum(counts, out=qsl[1:n + 1])
    qsl[n + 1:] = total + np.arange(1, rows - n + 1)
    ids = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in seqs),
                      np.int64, total)
    pos = np.arange(total, dtype=np.int64) - np.repeat(qsl[:n] - starts, counts)
    lens = np.fromiter((len(t) for t in tables), np.int64, n)
    flat = np.fromiter(itertools.chain.from_iterable(tables), np.int64, int(lens.sum()))
    first = np.zeros(n, np.int64)
    np.cumsum(lens[:-1], out=first[1:])
    slots = flat[np.repeat(first, counts) + pos // block_size] * block_size + pos % block_size
    table = np.zeros((rows, int(lens.max())), np.int32)
    table[np.repeat(np.arange(n), lens), np.arange(len(flat)) - np.repeat(first, lens)] = flat
    pad = rows - n
    samples = np.fromiter((s.samples for s in seqs), bool, n)
    return HostBatch(
        input_ids=np.concatenate([ids, np.zeros(pad, np.int64)]),
        positions=np.concatenate([pos, np.zeros(pad, np.int64)]),
        slot_mapping=np.concatenate([slots, np.full(pad, -1, np.int64)]),
        query_start_loc=qsl.astype(np.int32),
        seq_lens=np.concatenate([starts + counts, np.ones(pad, np.int64)]).astype(np.int32),
        block_tables=table,
        logits_rows=(qsl[1:n + 1] - 1)[samples],
    )
