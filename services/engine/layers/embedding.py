"""Token embedding and LM head split by vocabulary rows across tensor-parallel ranks.

Owns: ``VocabParallelEmbedding`` (rank r holds rows ``[r * per, (r + 1) * per)`` of
the table, padded at the end so every rank holds ``per = ceil(vocab / tp)`` rows;
a lookup zeroes the rows of other ranks' tokens and sums across ranks) and
``ParallelLMHead`` (the same layout; logits of every rank's rows gathered). A
model with tied embeddings computes its logits with the embedding itself.

Logits multiply by the table in the form the backend's ``linear`` reads fastest
(``Backend.prepare_linear_weight``: packed on CPU), made once after loading by
``prepare_weights``. The untied head replaces its table with it; a tied embedding keeps it
as a copy beside the table its lookup reads (an untied model's embedding makes none), where the copy takes at most
``HEAD_COPY_MAX_SHARE`` of the host's available memory (else logits read the table as it is).
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

from pdserve.engine.backends.base import Backend
from pdserve.engine.layers.context import LayerContext
from pdserve.engine.layers.loading import Shard, WeightSpec, read

HEAD_COPY_MAX_SHARE = 0.25


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, ctx: LayerContext, serves_logits: bool = True):
        super().__init__()
        self.ctx, self.serves_logits = ctx, serves_logits  # False: an untied model's input table only
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        per = -(-vocab_size // ctx.tp_size)
        self.start = min(ctx.tp_rank * per, vocab_size)
        self.end = min(self.start + per, vocab_size)
        self.weight = nn.Parameter(torch.empty(per, hidden_size, dtype=ctx.dtype), requires_grad=False)
        self.head_weight: torch.Tensor | None = None  # the table as the backend's linear reads it

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.start) | (input_ids >= self.end)
        rows = F.embedding((input_ids - self.start).masked_fill(outside, 0), self.weight)
        return self.ctx.comm.all_reduce(rows.masked_fill(outside.unsqueeze(-1), 0))

    def logits(self, hidden: torch.Tensor, be: Backend) -> torch.Tensor:
        """``hidden @ table.T`` over the whole vocabulary, float32."""
        out = be.linear(hidden, self.weight if self.head_weight is None else self.head_weight)
        if self.ctx.tp_size > 1:
            out = self.ctx.comm.all_gather(out, -1)[:, :self.vocab_size]
        return out.float()

    def prepare_weights(self, be: Backend) -> None:
        """Once, after loading: a copy of the table as ``be.linear`` reads it fastest, where it fits
        (none for a table that never computes logits)."""
        if not self.serves_logits:
            return
        table = self.weight.data
        if table.device.type != "cpu" or table.nbytes <= HEAD_COPY_MAX_SHARE * _available_host_bytes():
            self.head_weight = be.prepare_linear_weight(table)

    def weight_specs(self) -> tuple[WeightSpec, ...]:
        return (WeightSpec("weight", None, (self.vocab_size, self.hidden_size)),)

    def load_weight(self, param: str, tensor: torch.Tensor, shard: Shard = None) -> None:
        if param != "weight" or shard is not None:
            raise ValueError(f"{type(self).__name__} has no tensor {param!r} (part {shard!r})")
        if tuple(tensor.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"shape {tuple(tensor.shape)}, expected {(self.vocab_size, self.hidden_size)}")
        n = self.end - self.start
        self.weight.data[:n].copy_(read(tensor.narrow(0, self.start, n)))
        self.weight.data[n:].zero_()


class ParallelLMHead(VocabParallelEmbedding):
    """An untied LM head: the embedding's layout, used only through ``logits``, so the backend's
    form of the table replaces the table (no copy; nothing loads into it afterwards)."""

    def prepare_weights(self, be: Backend) -> None:
        self.weight = nn.Parameter(be.prepare_linear_weight(self.weight.data), requires_grad=False)


def _available_host_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # no such figure here: assume room
        return 1 << 62


__all__ = ["ParallelLMHead", "VocabParallelEmbedding"]
