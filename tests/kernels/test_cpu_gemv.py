"""pdserve's compiled CPU linear (kernels/cpu.py ``linear`` over ``pack_linear_weight``) against a float64 matmul.

Each build of the library is tested: native (AVX-512 FMA for float32, AVX512-BF16 dot
products for bfloat16), AVX-512 without BF16 (bf16 pairs as float32 FMAs), AVX2 + FMA (8-lane
halves of each 16-column block; bf16 pairs as float32 FMAs) and portable C
(no AVX-512, AVX2 or FMA). The kernel sums in float32 and rounds once, so every output is within
the float32 summation bound of the exact value (plus, in bfloat16, half a unit in the last
place of the rounding). Shapes cover register tiles cut short on
both sides: rows not a multiple of the tile's 6, K odd or not a multiple of 32, N not a
multiple of 16 (a last column block of fewer than 16), fewer column blocks than threads.
"""
from __future__ import annotations


import pytest
import torch

from pdserve.kernels.cpu import CpuKernels
from tests.kernels.cpu_builds import AVX2, CPU_FLAGS, PORTABLE, builds, built as built_kernels

VARIANTS = {"portable": PORTABLE, "avx2": AVX2, "no-avx512bf16": ("-mno-avx512bf16",)}
BUILDS = builds(VARIANTS)
KERNELS = BUILDS["native"]
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(5, 7), (16, 64), (67, 77), (100, 576), (200, 33)]  # (N, K)

pytestmark = pytest.mark.skipif(KERNELS is None, reason="no C compiler to build the CPU kernels")


def built(build: str):
    return built_kernels(BUILDS, build)


def check_linear(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out within the float32 summation bound of the exact product (bf16: plus its rounding)."""
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    magnitude = x.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.double().abs())
    bound = (x.shape[1] + 2) * 2.0 ** -24 * magnitude
    if out.dtype == torch.bfloat16:
        bound = bound + 2.0 ** -8 * exact.abs()
    assert out.dtype == x.dtype and out.shape == exact.shape and out.is_contiguous()
    excess = (out.double() - exact).abs() - bound
    assert torch.isfinite(out).all() and (excess <= 0).all(), f"max excess {excess.max().item():.3e}"


def operands(m: int, n: int, k: int, dtype: torch.dtype, with_bias: bool):
    x = torch.randn(m, k + 5).to(dtype)[:, 2:2 + k]  # strided rows
    weight = torch.randn(n, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    return x, weight, bias


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 5, 16, 45])
def test_linear(m: int, shape: tuple[int, int], with_bias: bool, dtype: torch.dtype, build: str) -> None:
    kernels = built(build)
    n, k = shape
    x, weight, bias = operands(m, n, k, dtype, with_bias)
    check_linear(kernels.linear(x, kernels.pack_linear_weight(weight), bias), x, weight, bias)


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_model_shapes(dtype: torch.dtype, build: str) -> None:
    kernels = built(build)
    for m, n, k in [(1, 960, 576), (3, 576, 1536), (8, 3072, 576)]:
        x, weight, bias = operands(m, n, k, dtype, False)
        check_linear(kernels.linear(x, kernels.pack_linear_weight(weight), bias), x, weight, bias)


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("n", [5, 40])
def test_linear_with_more_threads_than_column_blocks(n: int, build: str) -> None:
    kernels = built(build)
    x, weight, bias = operands(20, n, 50, torch.bfloat16, True)
    threads = torch.get_num_threads()
    torch.set_num_threads(8)  # the rows are split too
    try:
        out = kernels.linear(x, kernels.pack_linear_weight(weight), bias)
    finally:
        torch.set_num_threads(threads)
    check_linear(out, x, weight, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_of_no_rows_and_of_no_inputs(dtype: torch.dtype) -> None:
    x, weight, bias = operands(0, 20, 8, dtype, True)
    assert KERNELS.linear(x, KERNELS.pack_linear_weight(weight), bias).shape == (0, 20)
    x, weight, bias = operands(3, 20, 0, dtype, True)
    assert torch.equal(KERNELS.linear(x, KERNELS.pack_linear_weight(weight), bias), bias.expand(3, 20))


def test_linear_keeps_nan_and_inf() -> None:
    x, weight, _ = operands(2, 20, 8, torch.bfloat16, False)
    x[0, 3], x[1, 4] = float("nan"), float("inf")
    weight[:, 4] = weight[:, 4].abs() + 1  # row 1: +inf in every column
    out = KERNELS.linear(x, KERNELS.pack_linear_weight(weight))
    assert out[0].isnan().all() and (out[1] == float("inf")).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(1, 1), (48, 2)], ids=str)
def test_packed_layout_round_trip(shape: tuple[int, int], dtype: torch.dtype) -> None:
    n, k = shape
    weight = torch.randn(n, k).to(dtype)
    packed = CpuKernels.pack_linear_weight(weight)
    g = 2 if dtype == torch.bfloat16 else 1
    assert packed.shape == (n, -(-k // g), g) and packed.is_contiguous() and CpuKernels.is_packed_linear(packed)
    assert not CpuKernels.is_packed_linear(weight)
    assert torch.equal(CpuKernels.unpack_linear_weight(packed, k), weight)


def test_packed_layout_order() -> None:
    """Blocks of 16 columns, each group [16 columns][2 k]; the last block of N mod 16 columns
    alike; an odd K's last group zero in its second k."""
    n, k = 35, 5
    weight = torch.arange(n * k, dtype=torch.float32).view(n, k).to(torch.bfloat16)
    flat = CpuKernels.pack_linear_weight(weight).reshape(-1)
    padded = torch.cat([weight, torch.zeros(n, 1, dtype=weight.dtype)], 1)  # K = 6
    for c in range(n):
        block, col = divmod(c, 16)
        width = 16 if block < n // 16 else n % 16
        for kk in range(6):
            at = block * 16 * 6 + (kk // 2) * width * 2 + col * 2 + kk % 2
            assert flat[at] == padded[c, kk], (c, kk)


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_prepack_packs_where_the_dtype_is_vectorized(build: str) -> None:
    kernels = built(build)
    both, avx2 = {torch.float32, torch.bfloat16}, "avx2" in CPU_FLAGS and "fma" in CPU_FLAGS
    if "avx512f" in CPU_FLAGS:
        native = both if "avx512_bf16" in CPU_FLAGS else {torch.float32}
        expected = {"native": native, "no-avx512bf16": {torch.float32}, "avx2": both, "portable": set()}[build]
    else:  # every variant but the portable one is this CPU's AVX2 build (or plain C without AVX2)
        expected = both if avx2 and build != "portable" else set()
    assert kernels.linear_vec == expected
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        weight = torch.randn(40, 24).to(dtype)
        prepared = kernels.prepack_linear_weight(weight)
        if dtype in expected:
            assert torch.equal(prepared, kernels.pack_linear_weight(weight))
        else:
            assert prepared is weight


def test_linear_refuses_what_it_cannot_read() -> None:
    x, weight, bias = operands(4, 20, 30, torch.float32, True)
    packed = KERNELS.pack_linear_weight(weight)
    with pytest.raises(ValueError, match="packed weight"):
        KERNELS.linear(x.bfloat16(), packed)  # another dtype
    with pytest.raises(ValueError, match="packed weight"):
        KERNELS.linear(x[:, :28], packed)  # packed for another K
    with pytest.raises(ValueError, match="bias"):
        KERNELS.linear(x, packed, bias[:10])


def test_cpu_backend_linear_on_packed_and_plain_weights() -> None:
    from pdserve.engine.backends.cpu_backend import CpuBackend

    be = CpuBackend(KERNELS)
    for dtype in DTYPES:
        x, weight, bias = operands(6, 40, 24, dtype, True)
        prepared = be.prepare_linear_weight(weight)
        assert CpuKernels.is_packed_linear(prepared) == (dtype in KERNELS.linear_vec)
        out = be.linear(x.view(2, 3, 24) if x.is_contiguous() else x.reshape(2, 3, 24), prepared, bias)
        assert out.shape == (2, 3, 40)
        check_linear(out.view(6, 40), x, weight, bias)
    half = torch.randn(30, 8).half()
    assert be.prepare_linear_weight(half) is half


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prepared_linear_layer_and_lm_heads(dtype: torch.dtype) -> None:
    """What the engine does: a layer's weight packed by ``prepare_weights`` (after loading), logits of a
    tied embedding through a packed copy (its lookup reads the table as loaded), an untied
    head's table replaced by the packed form."""
    from pdserve.engine.backends.cpu_backend import CpuBackend
    from pdserve.engine.layers import LayerContext, ParallelLMHead, QKVParallelLinear, VocabParallelEmbedding

    if dtype not in KERNELS.linear_vec:
        pytest.skip(f"{dtype} is not packed by this build")
    be, ctx = CpuBackend(KERNELS), LayerContext(dtype=dtype)
    layer = QKVParallelLinear(40, 8, 4, 2, True, ctx)
    weights = {part: torch.randn(size, 40).to(dtype) for part, size in (("q", 32), ("k", 16), ("v", 16))}
    bias = {part: torch.randn(w.shape[0]).to(dtype) for part, w in weights.items()}
    for part in weights:
        layer.load_weight("weight", weights[part], part)
        layer.load_weight("bias", bias[part], part)
    layer.prepare_weights(be)
    assert CpuKernels.is_packed_linear(layer.weight) and isinstance(layer.weight, torch.nn.Parameter)
    x = torch.randn(3, 40).to(dtype)
    check_linear(layer(x, be), x, torch.cat(list(weights.values())), torch.cat(list(bias.values())))

    table, ids = torch.randn(50, 40).to(dtype), torch.tensor([3, 49, 0])
    tied, untied = VocabParallelEmbedding(50, 40, ctx), ParallelLMHead(50, 40, ctx)
    for head in (tied, untied):
        head.load_weight("weight", table)
        head.prepare_weights(be)
        out = head.logits(x, be)
        assert out.dtype == torch.float32
        check_linear(out.to(dtype), x, table, None)
    assert torch.equal(tied(ids), table[ids]) and torch.equal(tied.weight, table)
    assert CpuKernels.is_packed_linear(tied.head_weight) and CpuKernels.is_packed_linear(untied.weight)


def test_tied_head_without_room_for_a_copy_reads_the_table(monkeypatch) -> None:
    from pdserve.engine.backends.cpu_backend import CpuBackend
    from pdserve.engine.layers import LayerContext, VocabParallelEmbedding
    from pdserve.engine.layers import embedding

    monkeypatch.setattr(embedding, "_available_host_bytes", lambda: 1000)
    tied, table = VocabParallelEmbedding(50, 40, LayerContext()), torch.randn(50, 40)
    tied.load_weight("weight", table)
    be = CpuBackend(KERNELS)
    tied.prepare_weights(be)
    assert tied.head_weight is None
    x = torch.randn(2, 40)
    check_linear(tied.logits(x, be), x, table, None)


def test_untied_models_input_table_gets_no_head_copy() -> None:
    from pdserve.engine.backends.cpu_backend import CpuBackend
    from pdserve.engine.layers import LayerContext, VocabParallelEmbedding

    table = VocabParallelEmbedding(50, 40, LayerContext(), serves_logits=False)
    table.load_weight("weight", torch.randn(50, 40))
    table.prepare_weights(CpuBackend(KERNELS))
    assert table.head_weight is None
