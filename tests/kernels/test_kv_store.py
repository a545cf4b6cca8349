"""``store_kv`` against ``reference.store_kv_ref``: same cache, bit for bit."""
from __future__ import annotations

import pytest
import torch

from pdserve.kernels.kv_store import store_kv
from pdserve.kernels.reference import store_kv_ref

SIZES = ["small", pytest.param("large", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.float32, torch.float32),
                                                   (torch.bfloat16, torch.bfloat16),
                                                   (torch.float16, torch.float16),
                                                   (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("kv_heads,head_dim", [(2, 64), (3, 128), (8, 128)])
def test_store_kv(kv_heads: int, head_dim: int, block_size: int, src_dtype: torch.dtype,
                  cache_dtype: torch.dtype, size: str, device: torch.device) -> None:
    tokens, blocks = (40, 8) if size == "small" else (3000, 400)
    # The layer is a strided view of a block-major cache of 2 layers, filled with NaN.
    cache = torch.full((blocks, 2, 2, block_size, kv_heads, head_dim), float("nan"),
                       dtype=cache_dtype, device=device)
    kv_layer = cache[:, 1]
    slots = torch.randperm(blocks * block_size, device=device)[:tokens]
    slots[torch.rand(tokens, device=device) < 0.2] = -1  # padding tokens are skipped
    q_heads = 2 * kv_heads
    qkv = torch.randn(tokens, q_heads + 2 * kv_heads, head_dim, dtype=src_dtype, device=device)
    k, v = qkv[:, q_heads:q_heads + kv_heads], qkv[:, q_heads + kv_heads:]
    expected = cache.clone()
    store_kv_ref(k, v, expected[:, 1], slots)
    store_kv(k, v, kv_layer, slots)
    # A same-dtype store is a copy, bit for bit; a down-cast may differ by one rounding
    # step (Triton's CPU interpreter truncates float32 -> bfloat16).
    rtol = 0.0 if src_dtype == cache_dtype else 2.0 ** -7
    torch.testing.assert_close(cache, expected, rtol=rtol, atol=0, equal_nan=True)


def test_store_kv_rejects_mismatched_heads(device: torch.device) -> None:
    kv_layer = torch.zeros(4, 2, 16, 2, 64, device=device)
    k = torch.randn(3, 4, 64, device=device)
    with pytest.raises(ValueError, match="heads"):
        store_kv(k, k, kv_layer, torch.zeros(3, dtype=torch.int64, device=device))
