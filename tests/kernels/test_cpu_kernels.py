"""pdserve's compiled CPU kernels (kernels/cpu.py) against the torch references.

Skipped where no C compiler can build them (the engine then runs pure torch, see
test_cpu_backend_falls_back_without_a_compiler). Batches reuse the paged-attention
test's poisoning: shuffled tables padded with a NaN block, NaN past each sequence's
length, strided layer views.
"""
from __future__ import annotations

import pytest
import torch

from kernels.cpu import load_cpu_kernels
from tests.kernels.test_attention import make_batch, reference

KERNELS = load_cpu_kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="no C compiler to build the CPU kernels")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_decode_attention(group: int, head_dim: int, block_size: int, dtype: torch.dtype, check_close) -> None:
    kv_heads = 2
    seq_lens = torch.randint(1, 300, (6,)).tolist() + [1, block_size, 2 * block_size + 1, 16, 17]
    batch = make_batch([1] * len(seq_lens), seq_lens, group * kv_heads, kv_heads, head_dim, block_size,
                       dtype, torch.device("cpu"), block_major=group % 2 == 1)
    scale = head_dim ** -0.5
    out = KERNELS.decode_attention(batch.q, batch.kv_layer, batch.block_tables, batch.seq_lens, scale)
    check_close(out, reference(batch, scale), dtype)


@needs_kernels
def test_decode_attention_refuses_what_it_cannot_read() -> None:
    batch = make_batch([1], [5], 4, 2, 64, 16, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="dtypes"):
        KERNELS.decode_attention(batch.q.half(), batch.kv_layer.half(), batch.block_tables, batch.seq_lens, 1.0)
    with pytest.raises(ValueError, match="int32"):
        KERNELS.decode_attention(batch.q, batch.kv_layer, batch.block_tables.long(), batch.seq_lens, 1.0)
    with pytest.raises(ValueError, match="block must be contiguous"):
        wide = torch.cat([batch.kv_layer, batch.kv_layer], dim=-1)[..., :64]  # head dim strided
        KERNELS.decode_attention(batch.q, wide, batch.block_tables, batch.seq_lens, 1.0)


def test_cpu_backend_falls_back_without_a_compiler(monkeypatch, tmp_path) -> None:
    from services.engine.backends.cpu_backend import CpuBackend
    from services.engine.backends.torch_backend import TorchBackend
    from services.engine.platforms.cpu import CpuPlatform

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert type(CpuPlatform().backend()) is TorchBackend
    monkeypatch.delenv("CC")
    assert type(CpuPlatform().backend(compiled_cpu_kernels=False)) is TorchBackend
    if KERNELS is not None:
        assert isinstance(CpuPlatform().backend(), CpuBackend)
