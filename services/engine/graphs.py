"""Decode-step graphs: one captured forward (model + logits) per padded batch size.

Owns: static device buffers sized for the largest batch (token ids, positions, KV
slots, context lengths, block tables) and their host mirrors (page-locked on
accelerators), one graph and its logits output per batch size, and the memory pool
the graphs share. Lifecycle: built after the KV cache is
allocated; ``capture`` once (largest batch first, so smaller graphs reuse its pool);
then ``run`` per decode step: copy the step's host inputs into the static buffers,
replay, return the first rows of the logits.

NOTE: the captured attention was launched with ``max_seq_len = max_model_len`` and
block tables ``ceil(max_model_len / block_size)`` wide, so any context up to the
model's length replays correctly; the split count of the decode kernel is the one
chosen for that bound. The query offsets are constant (one token per row).
NOTE (LoRA): with adapters on, every size is captured twice: with the layers' LoRA delta
kernels (captured inside the adapters' ``capturing`` context; they read each token's
adapter slot from ``lora.rows.StepRows``' buffer, which the rank writes before ``run``,
padding rows -1) and without them, for steps in which no row has an adapter (no empty
LoRA launches: ~0.5-0.7 ms of a Llama-3-8B step on an H100).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import numpy as np
import torch

from pdserve.engine.backends.base import AttentionMetadata, Backend
from pdserve.engine.models.interface import CausalLM
from pdserve.engine.batch import DeviceFeed, HostBatch
from pdserve.engine.platforms.base import Graph, Platform


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, backend: Backend,
                 platform: Platform, device: torch.device, sizes: tuple[int, ...],
                 block_size: int, max_model_len: int):
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.platform = platform
        self.sizes = tuple(sorted(sizes))
        self.max_model_len = max_model_len
        rows, width = self.sizes[-1], -(-max_model_len // block_size)
        pin = platform.pin_memory and device.type != "cpu"
        # tokens rows: input ids, positions, KV slots (-1: not stored)
        self.tokens = torch.zeros((3, rows), dtype=torch.long, device=device)
        self.tokens[2] = -1
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((rows, width), dtype=torch.int32, device=device)
        # Host mirrors the step's inputs are written into, then copied in three transfers.
        self.host = {name: torch.empty_like(t, device="cpu", pin_memory=pin)
                     for name, t in (("tokens", self.tokens), ("seq_lens", self.seq_lens),
                                     ("block_tables", self.block_tables))}
        self.host_np = {name: t.numpy() for name, t in self.host.items()}
        self.copied = platform.new_event()  # recorded after the copies out of the host mirrors
        self.graphs: dict[int, tuple[Graph, torch.Tensor]] = {}
        self.plain: dict[int, tuple[Graph, torch.Tensor]] = {}  # captured without adapter kernels (LoRA on)

    def padded_size(self, num_seqs: int) -> int:
        """The smallest captured batch size that holds num_seqs, or 0 if none does."""
        return next((b for b in self.sizes if b >= num_seqs), 0)

    def replay(self, b: int, adapters: bool = True) -> None:
        """Replay captured size b on whatever inputs the last step left (a benchmark's forward-only
        timing); ``adapters`` as in ``run``."""
        self._captured(b, adapters)[0].replay()

    def _captured(self, b: int, adapters: bool) -> tuple[Graph, torch.Tensor]:
        return self.graphs[b] if adapters or b not in self.plain else self.plain[b]

    @torch.inference_mode()
    def capture(self, adapters: Callable[[], ContextManager[None]] | None = None) -> None:
        """Capture every size (``adapters``: the context in which the layers launch their LoRA
        kernels; each size is then also captured outside it, for steps without adapters)."""
        pool = self.platform.graph_pool()
        for b in reversed(self.sizes):
            with adapters() if adapters is not None else contextlib.nullcontext():
                self.graphs[b] = self._capture(b, pool)
            if adapters is not None:
                self.plain[b] = self._capture(b, pool)
        self.platform.synchronize(self.tokens.device)

    def _capture(self, b: int, pool: object) -> tuple[Graph, torch.Tensor]:
        self._forward(b)  # warm-up: compiles kernels, sizes the allocator's blocks
        return self.platform.capture_graph(lambda: self._forward(b), pool)

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.tokens[2, :b], query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b],
            max_query_len=1, max_seq_len=self.max_model_len,
            query_lens_cpu=(1,) * b, seq_lens_cpu=(self.max_model_len,) * b)  # upper bounds
        hidden = self.model(self.tokens[0, :b], self.tokens[1, :b], self.kv_cache, meta, self.backend)
        return self.model.compute_logits(hidden, self.backend)

    def run(self, batch: HostBatch, num_seqs: int, feed: DeviceFeed | None = None,
            upload: Callable[[np.ndarray], torch.Tensor] | None = None, adapters: bool = True) -> torch.Tensor:
        """Logits [num_seqs, vocab] of a decode step whose host batch is padded to a captured size;
        ``feed`` overwrites input tokens with ones on the device (``upload`` moves its indices);
        ``adapters``: some row has a LoRA adapter (False picks the graph without their kernels)."""
        b = batch.num_rows
        graph, logits = self._captured(b, adapters)
        self.copied.synchronize()  # the last step's copies have left the host mirrors
        tokens, tables = self.host_np["tokens"], self.host_np["block_tables"]
        tokens[0, :b], tokens[1, :b], tokens[2, :b] = batch.input_ids, batch.positions, batch.slot_mapping
        self.host_np["seq_lens"][:b] = batch.seq_lens
        # NOTE: columns past the step's widest table keep stale block ids; the kernel
        # reads only a sequence's first ceil(seq_len / block_size) entries.
        tables[:b, :batch.block_tables.shape[1]] = batch.block_tables
        self.tokens.copy_(self.host["tokens"], non_blocking=True)
        self.seq_lens[:b].copy_(self.host["seq_lens"][:b], non_blocking=True)
        self.block_tables[:b].copy_(self.host["block_tables"][:b], non_blocking=True)
        self.copied.record()
        if feed is not None:
            feed.apply(self.tokens[0], upload)
        graph.replay()
        return logits[:num_seqs]


__all__ = ["DecodeGraphs"]
