"""pdserve's compiled CPU kernels (kernels/cpu.py) against the torch references.

Skipped where no C compiler can build them (the engine then runs pure torch, see
test_cpu_backend_falls_back_without_a_compiler). Batches reuse the paged-attention
test's poisoning: shuffled tables padded with a NaN block, NaN past each sequence's
length, strided layer views.
"""
from __future__ import annotations

import platform

import pytest
import torch

from pdserve.kernels.cpu import load_cpu_kernels
from tests.kernels.cpu_builds import AVX2, PORTABLE
from tests.kernels.test_attention import make_batch, reference, scenario

KERNELS = load_cpu_kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="no C compiler to build the CPU kernels")


X86 = platform.machine().lower() in ("x86_64", "amd64")
# The code paths of other x86 CPUs, built here by switching features off: plain C, AVX2 + FMA
# without AVX-512, and AVX-512 without its BF16 dot products.
VARIANTS = {"portable": PORTABLE, "avx2": AVX2, "no-avx512bf16": ("-mno-avx512bf16",)}
BUILDS = {"native": KERNELS, **{name: load_cpu_kernels(extra_flags=flags) if KERNELS is not None and X86 else None
                                for name, flags in VARIANTS.items()}}


def built(build: str):
    kernels = BUILDS[build]
    if kernels is None:
        pytest.skip(f"no {build} build of the CPU kernels here")
    return kernels


@needs_kernels
@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("name", ["decode", "mixed", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [8, 12, 16, 32])  # 12: a block not a whole number of 8-token chunks
@pytest.mark.parametrize("head_dim", [64, 128, 80, 96])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_paged_attention(group: int, head_dim: int, block_size: int, dtype: torch.dtype, name: str, build: str,
                         check_close) -> None:
    kernels = built(build)
    if name == "decode":
        seq_lens = torch.randint(1, 300, (6,)).tolist() + [1, block_size, 2 * block_size + 1, 16, 17]
        q_lens = [1] * len(seq_lens)
        q_lens[2] = 0  # a sequence with nothing scheduled this step
    else:
        q_lens, seq_lens = scenario(name, "small", block_size)
        if name == "prefill":  # longer than one tile of rows, and the tile boundary
            q_lens, seq_lens = q_lens + [70, 32], seq_lens + [70, 45]
    batch = make_batch(q_lens, seq_lens, group * 2, 2, head_dim, block_size, dtype, torch.device("cpu"),
                       block_major=group % 2 == 1)
    scale = head_dim ** -0.5
    out = kernels.paged_attention(batch.q, batch.kv_layer, batch.query_start_loc, batch.seq_lens,
                                  batch.block_tables, scale)
    check_close(out, reference(batch, scale), dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [2, 5, 8])
def test_paged_attention_decode_head_tiles(group: int, dtype: torch.dtype, check_close) -> None:
    """Decode rows take the query heads of a KV head in tiles of up to 3 (5 = 3 + 2,
    8 = 3 + 3 + 2) and the cache in spans of several 16-token chunks."""
    seq_lens = [1, 15, 16, 17, 63, 64, 65, 129, 300]
    batch = make_batch([1] * len(seq_lens), seq_lens, group * 2, 2, 64, 16, dtype, torch.device("cpu"))
    out = KERNELS.paged_attention(batch.q, batch.kv_layer, batch.query_start_loc, batch.seq_lens,
                                  batch.block_tables, 0.125)
    check_close(out, reference(batch, 0.125), dtype)

@needs_kernels
def test_paged_attention_refuses_what_it_cannot_read() -> None:
    b = make_batch([1], [5], 4, 2, 64, 16, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="dtypes"):
        KERNELS.paged_attention(b.q.half(), b.kv_layer.half(), b.query_start_loc, b.seq_lens, b.block_tables, 1.0)
    with pytest.raises(ValueError, match="int32"):
        KERNELS.paged_attention(b.q, b.kv_layer, b.query_start_loc, b.seq_lens, b.block_tables.long(), 1.0)
    with pytest.raises(ValueError, match="block must be contiguous"):
        wide = torch.cat([b.kv_layer, b.kv_layer], dim=-1)[..., :64]  # head dim strided
        KERNELS.paged_attention(b.q, wide, b.query_start_loc, b.seq_lens, b.block_tables, 1.0)


def test_cpu_backend_falls_back_without_a_compiler(monkeypatch, tmp_path) -> None:
    from pdserve.engine.backends.cpu_backend import CpuBackend
    from pdserve.engine.backends.torch_backend import TorchBackend
    from pdserve.engine.platforms.cpu import CpuPlatform

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert type(CpuPlatform().backend()) is TorchBackend
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails to build
    assert load_cpu_kernels(cache_dir=tmp_path) is None
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    monkeypatch.delenv("CC")
    assert type(CpuPlatform().backend(compiled_cpu_kernels=False)) is TorchBackend
    if KERNELS is not None:
        assert isinstance(CpuPlatform().backend(), CpuBackend)


@pytest.mark.parametrize("build", sorted(BUILDS))
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("n", [576, 100])  # 100: a row's last 4 past the 16-wide vectors
def test_rms_norm(dtype: torch.dtype, with_residual: bool, n: int, build: str, check_close) -> None:
    from pdserve.kernels.reference import rms_norm_ref

    wide = torch.randn(37, 700, dtype=dtype)
    x = wide[:, :n]  # strided rows, as a view of a wider buffer
    residual = torch.randn(37, n, dtype=dtype) if with_residual else None
    weight = torch.randn(n, dtype=dtype)
    out, res = built(build).rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_res = rms_norm_ref(x.float(), weight.float(), 1e-5, None if residual is None else residual.float())
    check_close(out, ref_out, dtype, "normed")
    check_close(res, ref_res, dtype, "residual")
    if dtype == torch.bfloat16:  # rounds where the reference rounds: bit-equal but for rare sum-order ties
        same_dtype = rms_norm_ref(x, weight, 1e-5, residual)
        assert torch.equal(res, same_dtype[1])
        assert (out != same_dtype[0]).float().mean() < 0.01


@pytest.mark.parametrize("build", sorted(BUILDS))
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_silu_and_mul(dtype: torch.dtype, build: str, check_close) -> None:
    from pdserve.kernels.reference import silu_and_mul_ref

    x = torch.randn(29, 2 * 1536, dtype=dtype) * 3
    out = built(build).silu_and_mul(x)
    check_close(out, silu_and_mul_ref(x.float()), dtype)
    if dtype == torch.bfloat16:
        assert (out != silu_and_mul_ref(x)).float().mean() < 0.01


@pytest.mark.parametrize("build", sorted(BUILDS))
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_store_kv(dtype: torch.dtype, head_dim: int, build: str, check_close) -> None:
    from pdserve.kernels.reference import build_cos_sin_cache, rotary_ref, store_kv_ref

    tokens, hq, hkv, bs = 23, 6, 2, 16
    qkv = torch.randn(tokens, hq + 2 * hkv, head_dim, dtype=dtype)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    positions = torch.randint(0, 4000, (tokens,))
    cos_sin = build_cos_sin_cache(head_dim, 4096, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    slots = torch.randperm(8 * bs)[:tokens]
    slots[3] = -1  # a padding row: not stored
    cache = torch.full((3, 8, 2, bs, hkv, head_dim), float("nan"), dtype=dtype)[1]
    ref_cache = cache.clone()
    ref_q, ref_k = rotary_ref(q.float(), k.float(), positions, cos_sin)
    store_kv_ref(ref_k, v.float(), ref_cache, slots)
    got_q, got_k = built(build).rotary_store_kv(q, k, v, positions, cos_sin, cache, slots)
    assert got_q.data_ptr() == q.data_ptr()  # rotated in place
    check_close(got_q, ref_q, dtype, "q")
    check_close(got_k, ref_k, dtype, "k")
    stored = slots >= 0
    written = cache.transpose(0, 1).reshape(2, 8 * bs, hkv, head_dim)  # [K/V, slot, hkv, d]
    expected = ref_cache.transpose(0, 1).reshape(2, 8 * bs, hkv, head_dim)
    check_close(written[:, slots[stored]], expected[:, slots[stored]].float(), dtype, "cache")
    untouched = torch.ones(8 * bs, dtype=torch.bool)
    untouched[slots[stored]] = False
    assert written[:, untouched].isnan().all()
