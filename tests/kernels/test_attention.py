"""Paged attention kernels against ``reference.paged_attention_ref``.

Every batch uses shuffled (non-contiguous) block tables whose padding points at a
NaN-filled block, NaN in every cache slot past a sequence's length, a strided KV
layer view and a NaN-poisoned output, so stray reads and unwritten rows fail.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from pdserve.kernels.attention import DecodeConfig, paged_attention, paged_decode_attention
from pdserve.kernels.reference import paged_attention_ref
from .conftest import HAS_CUDA
from .pairwise import pairwise_params

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KV_HEADS = {"small": 2, "large": 8}
SIZES = ["small", pytest.param("large", marks=pytest.mark.gpu)]


@dataclass
class Batch:
    q: torch.Tensor
    kv_layer: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int


def make_batch(q_lens: list[int], seq_lens: list[int], q_heads: int, kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, device: torch.device,
               block_major: bool = False) -> Batch:
    """Random batch; q_lens[b] queries are the last positions of seq_lens[b] tokens."""
    n_blocks = [math.ceil(s / block_size) for s in seq_lens]
    total = sum(n_blocks) + 4  # spare blocks stay NaN; the last one pads the tables
    shape = (block_size, kv_heads, head_dim)
    if block_major:  # all layers of a block together: the layer view has a strided block dim
        kv_layer = torch.randn(total, 3, 2, *shape, dtype=dtype, device=device)[:, 1]
    else:
        kv_layer = torch.randn(3, total, 2, *shape, dtype=dtype, device=device)[1]
    poison = total - 1
    tables = torch.full((len(seq_lens), max(n_blocks, default=0) + 3), poison, dtype=torch.int32)
    perm = torch.randperm(total - 4).to(torch.int32)
    used, start = torch.zeros(total, dtype=torch.bool), 0
    for b, (n, seq_len) in enumerate(zip(n_blocks, seq_lens)):
        tables[b, :n] = perm[start:start + n]
        start += n
        used[tables[b, :n].long()] = True
        if seq_len % block_size:
            kv_layer[tables[b, n - 1].long(), :, seq_len % block_size:] = float("nan")
    kv_layer[(~used).to(device)] = float("nan")
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    tokens = int(qsl[-1])
    # q is a view into a fused QKV-like buffer, as the engine hands it over.
    qkv = torch.randn(tokens, q_heads + 2 * kv_heads, head_dim, dtype=dtype, device=device)
    return Batch(qkv[:, :q_heads], kv_layer, qsl.to(device),
                 torch.tensor(seq_lens, dtype=torch.int32, device=device), tables.to(device),
                 max(q_lens, default=0), max(seq_lens, default=0))


def scenario(name: str, size: str, block_size: int) -> tuple[list[int], list[int]]:
    """(q_lens, seq_lens) of a batch shape."""
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    big = size == "large"

    def rand(lo: int, hi: int, n: int) -> list[int]:
        return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()

    if name in ("decode", "decode_split"):
        seq_lens = rand(1, 4096 if big else 160, 24 if big else 5) + [1, 3 * block_size]
        q_lens = [1] * len(seq_lens)
        q_lens[2] = 0  # a sequence with nothing scheduled this step
        return q_lens, seq_lens
    if name == "mixed":
        # decodes, an idle sequence, prefix-cached chunks that start mid-block, a fresh prompt
        chunk = rand(100, 700, 3) if big else rand(3, 20, 3)
        prefix = rand(1, 2000, 3) if big else rand(1, 40, 3)
        fresh = rand(200, 900, 1) if big else rand(10, 40, 1)
        q_lens = [1, 0, *chunk, fresh[0], 1]
        seq_lens = [rand(1, 3000 if big else 90, 1)[0], 17, *(c + p for c, p in zip(chunk, prefix)),
                    fresh[0], 1]
        return q_lens, seq_lens
    if name == "prefill":
        lens = rand(300, 1500, 4) if big else rand(5, 50, 2)
        return lens, lens
    raise ValueError(name)


def reference(batch: Batch, scale: float) -> torch.Tensor:
    """The float32 reference, on the CPU (it builds its causal mask there)."""
    return paged_attention_ref(batch.q.float().cpu(), batch.kv_layer.float().cpu(),
                               batch.query_start_loc.cpu(), batch.seq_lens.cpu(),
                               batch.block_tables.cpu(), scale)


def run_attention(name: str, batch: Batch, scale: float, out: torch.Tensor) -> torch.Tensor:
    args = (batch.q, batch.kv_layer, batch.query_start_loc, batch.seq_lens, batch.block_tables, scale)
    if name == "decode_split":  # forced split, smaller tiles than the default on the GPU
        on_gpu = out.device.type == "cuda"
        cfg = DecodeConfig(block_n=16 if on_gpu else 32, num_warps=4, num_stages=2 if on_gpu else 1,
                           num_splits=3 if on_gpu else 2)
        return paged_decode_attention(*args, batch.max_seq_len, out=out, config=cfg)
    return paged_attention(*args, batch.max_query_len, batch.max_seq_len, out=out)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("group,head_dim,block_size,dtype,name", pairwise_params(
    ([1, 3, 4], [64, 128], [16, 32], DTYPES, ["decode", "decode_split", "mixed", "prefill"]), full=HAS_CUDA), ids=str)
def test_paged_attention(group: int, head_dim: int, block_size: int, dtype: torch.dtype, name: str,
                         size: str, device: torch.device, check_close) -> None:
    kv_heads = KV_HEADS[size]
    q_lens, seq_lens = scenario(name, size, block_size)
    batch = make_batch(q_lens, seq_lens, group * kv_heads, kv_heads, head_dim, block_size, dtype,
                       device, block_major=(group + head_dim // 64) % 2 == 0)
    scale = head_dim ** -0.5
    out = torch.full_like(batch.q, float("nan"))
    result = run_attention(name, batch, scale, out)
    assert result.data_ptr() == out.data_ptr()
    ref = reference(batch, scale)
    check_close(out, ref, dtype)


@pytest.mark.parametrize("head_dim", [32, 256])
def test_paged_attention_head_dims(head_dim: int, device: torch.device, check_close) -> None:
    for name in ("decode_split", "mixed"):
        q_lens, seq_lens = scenario(name, "small", 16)
        batch = make_batch(q_lens, seq_lens, 4, 2, head_dim, 16, torch.float32, device)
        out = torch.full_like(batch.q, float("nan"))
        run_attention(name, batch, 0.3, out)
        ref = reference(batch, 0.3)
        check_close(out, ref, torch.float32, name)


def test_paged_attention_allocates_output(device: torch.device, check_close) -> None:
    batch = make_batch([1, 4], [20, 9], 4, 2, 64, 16, torch.float32, device)
    out = paged_attention(batch.q, batch.kv_layer, batch.query_start_loc, batch.seq_lens,
                          batch.block_tables, 0.125, batch.max_query_len, batch.max_seq_len)
    ref = reference(batch, 0.125)
    check_close(out, ref, torch.float32)


def test_paged_attention_rejects_bad_shapes(device: torch.device) -> None:
    batch = make_batch([1], [5], 4, 2, 64, 16, torch.float32, device)
    with pytest.raises(ValueError, match="heads"):
        paged_attention(batch.q[:, :3], batch.kv_layer, batch.query_start_loc, batch.seq_lens,
                        batch.block_tables, 0.1, 1, 5)
    with pytest.raises(ValueError, match="int32"):
        paged_attention(batch.q, batch.kv_layer, batch.query_start_loc, batch.seq_lens,
                        batch.block_tables.long(), 0.1, 1, 5)
