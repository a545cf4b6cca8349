"""Runs the model for one scheduled step: builds batch tensors, calls the forward, returns logits.

Owns: the model, the KV cache tensor ``[num_layers, num_blocks, 2, block_size,
num_kv_heads, head_dim]`` (allocated once by the engine), the backend, and, where
the platform has graphs, the captured decode-step graphs (``DecodeGraphs``).
Bookkeeping stays with the scheduler; the runner only turns a step plan's rows and
their block tables into tensors. Lifecycle: wired in ``__init__``; ``capture_graphs()`` once before the
first step (optional); then ``execute()`` per step.

A step's inputs are built on the host with numpy (``build_host_batch``) and copied
to the device in one non-blocking copy per tensor from page-locked memory, so the
only host synchronisation of a step is the sampler's final token fetch. Input
tokens the host does not know yet (sampled by the step still running) come from
device memory instead (``DeviceFeed``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

import numpy as np
import torch

from pdserve.engine.backends.base import AttentionMetadata, Backend
from pdserve.engine.batch import DeviceFeed, HostBatch, build_host_batch
from pdserve.engine.graphs import DecodeGraphs
from pdserve.engine.kv_connector.worker_side import LayerHook
from pdserve.engine.models.interface import CausalLM
from pdserve.engine.platforms.base import Platform
from pdserve.engine.plan import PlannedRow



@dataclass(frozen=True)
class RunnerConfig:
    block_size: int
    max_model_len: int
    graph_batch_sizes: tuple[int, ...] = ()  # padded batch sizes of captured decode graphs; () = eager only


def graph_batch_sizes(max_batch_size: int, largest: int = 256) -> tuple[int, ...]:
    """Powers of two up to the one covering max_batch_size, at most ``largest``."""
    sizes, b = [], 1
    while b <= largest:
        sizes.append(b)
        if b >= max_batch_size:
            break
        b *= 2
    return tuple(sizes)


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, backend: Backend,
                 platform: Platform, device: torch.device, config: RunnerConfig):
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.platform = platform
        self.device = device
        self.config = config
        self.graphs: DecodeGraphs | None = None

    def capture_graphs(self, adapters: Callable[[], ContextManager[None]] | None = None) -> None:
        """Capture one decode graph per configured batch size (no-op without sizes); with LoRA
        (``adapters``: the context its kernels are captured in) also one without them."""
        if not self.config.graph_batch_sizes:
            return
        graphs = DecodeGraphs(self.model, self.kv_cache, self.backend, self.platform, self.device,
                              self.config.graph_batch_sizes, self.config.block_size, self.config.max_model_len)
        graphs.capture(adapters)
        self.graphs = graphs

    def _upload(self, arr: np.ndarray) -> torch.Tensor:
        """A host array as a device tensor; on accelerators the copy is made from page-locked
        memory and does not block the host."""
        t = torch.from_numpy(arr)
        if self.device.type == "cpu":
            return t
        return (t.pin_memory() if self.platform.pin_memory else t).to(self.device, non_blocking=True)

    def build_metadata(self, batch: HostBatch, max_query_len: int,
                       max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) on the device."""
        qsl = batch.query_start_loc
        meta = AttentionMetadata(
            slot_mapping=self._upload(batch.slot_mapping),
            query_start_loc=self._upload(qsl),
            seq_lens=self._upload(batch.seq_lens),
            block_tables=self._upload(batch.block_tables),
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            query_lens_cpu=tuple((qsl[1:] - qsl[:-1]).tolist()),
            seq_lens_cpu=tuple(batch.seq_lens.tolist()),
        )
        return self._upload(batch.input_ids), self._upload(batch.positions), meta

    @torch.inference_mode()
    def execute(self, rows: tuple[PlannedRow, ...], block_tables: list[list[int]],
                on_layer_done: LayerHook | None = None, feed: DeviceFeed | None = None,
                adapters: bool = True) -> torch.Tensor:
        """Logits [S, vocab] (float32) for the rows that sample this step, in order
        (``adapters``: False when no row has a LoRA adapter)."""
        bs = self.config.block_size
        padded = self._graph_size(rows) if on_layer_done is None else 0
        if padded:
            batch = build_host_batch(rows, block_tables, bs, pad_to=padded)
            return self.graphs.run(batch, len(rows), feed, self._upload, adapters)
        batch = build_host_batch(rows, block_tables, bs)
        max_q = max(s.num_new for s in rows)
        max_seq = max(s.start + s.num_new for s in rows)
        input_ids, positions, meta = self.build_metadata(batch, max_q, max_seq)
        if feed is not None:
            feed.apply(input_ids, self._upload)
        hook = self._with_events(on_layer_done) if on_layer_done is not None else None
        hidden = self.model(input_ids, positions, self.kv_cache, meta, self.backend, hook)
        return self.model.compute_logits(hidden[self._upload(batch.logits_rows)], self.backend)

    def _with_events(self, on_layer_done: LayerHook) -> Callable[[int], None]:
        """The model calls its hook once a layer's work is queued, not done: on an
        accelerator the host runs ahead, so each call carries an event recorded after
        the layer, and a reader of that layer's KV must wait until it has passed."""
        def hook(layer: int) -> None:
            event = self.platform.new_event()
            event.record()
            on_layer_done(layer, event)
        return hook

    def _graph_size(self, rows: tuple[PlannedRow, ...]) -> int:
        """The padded batch size of a captured graph for this step, or 0 to run eagerly.

        Graphs hold decode steps only: one new token per sequence, every sequence sampling.
        """
        if self.graphs is None or not all(s.num_new == 1 and s.samples for s in rows):
            return 0
        return self.graphs.padded_size(len(rows))
