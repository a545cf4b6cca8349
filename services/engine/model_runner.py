"""Runs the model for one scheduled step: builds batch tensors, calls the forward, returns logits.

Owns: the model, the KV cache tensor ``[num_layers, num_blocks, 2, block_size,
num_kv_heads, head_dim]`` (allocated once), and the backend. Bookkeeping stays
with the scheduler; the runner only turns a ``SchedulerOutput`` into tensors.
"""
from __future__ import annotations

from typing import Callable

import torch

from services.engine.backends.base import AttentionMetadata, Backend
from services.engine.models.llama import LlamaForCausalLM
from services.engine.scheduler import SchedulerOutput

LayerHook = Callable[[int], None]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, backend: Backend,
                 block_size: int, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.block_size = block_size
        self.device = device

    def build_metadata(self, out: SchedulerOutput, block_tables: list[list[int]]
                       ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """(input_ids, positions, metadata, logits_indices) for the scheduled sequences."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qsl = [0]
        logits_idx: list[int] = []
        for seq, table in zip(out.seqs, block_tables):
            span = range(seq.start, seq.start + seq.num_new)
            ids.extend(seq.req.token_ids[seq.start:seq.start + seq.num_new])
            pos.extend(span)
            slots.extend(table[p // bs] * bs + p % bs for p in span)
            qsl.append(qsl[-1] + seq.num_new)
            if seq.samples:
                logits_idx.append(qsl[-1] - 1)
        seq_lens = [s.start + s.num_new for s in out.seqs]
        width = max(len(t) for t in block_tables)
        tables = [t + [0] * (width - len(t)) for t in block_tables]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            max_query_len=max(s.num_new for s in out.seqs),
            max_seq_len=max(seq_lens),
            query_lens_cpu=tuple(s.num_new for s in out.seqs),
            seq_lens_cpu=tuple(seq_lens),
        )
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                meta, torch.tensor(logits_idx, dtype=torch.long, device=dev))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_tables: list[list[int]],
                on_layer_done: LayerHook | None = None) -> torch.Tensor:
        """Logits [S, vocab] (float32) for the sequences that sample this step, in order."""
        input_ids, positions, meta, logits_idx = self.build_metadata(out, block_tables)
        hidden = self.model(input_ids, positions, self.kv_cache, meta, self.backend, on_layer_done)
        return self.model.compute_logits(hidden[logits_idx])
