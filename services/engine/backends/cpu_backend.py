"""CPU backend: the torch reference backend with pdserve's compiled CPU kernels where they apply.

Owns: the loaded ``CpuKernels`` (built once, when the platform makes the backend).
Decode rows of a float32 or bfloat16 cache are attended by the compiled kernel,
which reads K and V in place through the block tables (no gather); everything else,
and every case the kernels do not cover, runs the torch code it inherits.
"""
from __future__ import annotations

import torch

from kernels.cpu import CpuKernels
from services.engine.backends.torch_backend import TorchBackend


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, kernels: CpuKernels):
        self.kernels = kernels

    def _decode(self, q, kv_layer, meta, seqs, scale):
        if q.dtype != kv_layer.dtype or not self.kernels.supports(q.dtype):
            return super()._decode(q, kv_layer, meta, seqs, scale)
        if len(seqs) == meta.num_seqs:
            tables, lens = meta.block_tables, meta.seq_lens
        else:
            rows = torch.tensor(seqs, dtype=torch.long)
            tables, lens = meta.block_tables.index_select(0, rows), meta.seq_lens.index_select(0, rows)
        return self.kernels.decode_attention(q, kv_layer, tables, lens, scale)
