"""pdserve's compiled CPU W8A8 kernels (kernels/cpu.py) against the int8 torch references.

Each build of the library is tested: native, portable C, AVX2 without AVX-512 (the AVX2
GEMM beside portable quantization), AVX-512 without VNNI (the AVX2 GEMM beside vector
quantization) and AVX-512 without BF16 (bf16 stores by bit arithmetic). int32 sums are exact and the GEMM's epilogue is
the reference's float64 one, so ``int8_linear`` equals the reference; ``quant_per_token``
equals it too (same division and rounding); the fused quantizers may move a value by
one step where their normed / activated value differs from torch's in the last bit.
"""
from __future__ import annotations


import pytest
import torch

from pdserve.kernels import reference as ref
from tests.kernels.cpu_builds import AVX2, CPU_FLAGS, PORTABLE, builds, built as built_kernels

VARIANTS = {"portable": PORTABLE, "avx2": AVX2, "no-avx512vnni": ("-mno-avx512vnni",),
            "no-avx512bf16": ("-mno-avx512bf16",)}
BUILDS = builds(VARIANTS)
KERNELS = BUILDS["native"]
ROWS = [0, 1, 3, 16, 64, 300]
DTYPES = [torch.float32, torch.bfloat16]

pytestmark = pytest.mark.skipif(KERNELS is None, reason="no C compiler to build the CPU kernels")


def built(build: str):
    return built_kernels(BUILDS, build)


def strided_rows(rows: int, n: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """[rows, n] as a view of a wider buffer (row stride n + 7); a zero row among them."""
    x = (torch.randn(rows, n + 7) * scale).to(dtype)[:, 3:3 + n]
    if rows > 2:
        x[1] = 0
    return x


def check_quant(q: torch.Tensor, scale: torch.Tensor, ref_q: torch.Tensor, ref_scale: torch.Tensor,
                dtype: torch.dtype, exact: bool) -> None:
    assert q.dtype == torch.int8 and q.shape == ref_q.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == ref_scale.shape
    if exact:
        assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
        return
    rtol, steps = fused_quant_bounds(dtype)
    assert torch.allclose(scale, ref_scale, rtol=rtol, atol=0)
    diff = (q.int() - ref_q.int()).abs()
    assert int((diff > steps).sum()) == 0 and int((diff != 0).sum()) <= diff.numel() // 100


def fused_quant_bounds(dtype: torch.dtype) -> tuple[float, int]:
    """(scale's relative bound, q's bound in steps) of a fused quantizer against torch.

    The kernel's float32 sum of squares (or exp) differs from torch's in the last bits, so
    an element rounded to bf16 twice (normed to bf16, times w, to bf16 again) can land two
    bf16 steps from torch's: one step of the first rounding is up to 2^-7 of the value, the
    second rounding adds 2^-8. The row's largest value sets its scale, so the scale may
    move by 3 * 2^-8, and q = x / scale (up to 127) by 1.5 steps plus its own rounding."""
    if dtype == torch.float32:
        return 1e-6, 1
    return 3 * 2.0 ** -8, 2


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [200, 576])
@pytest.mark.parametrize("rows", ROWS)
def test_quant_per_token(rows: int, n: int, dtype: torch.dtype, build: str) -> None:
    x = strided_rows(rows, n, dtype, 3.0)
    if rows > 3:  # scale 1 and exact ties (x / scale = j + 0.5): half to even, as torch.round
        x[3] = torch.arange(n, dtype=torch.float32).remainder(254).sub(126.5).to(dtype)
        x[3, 0] = 127
    q, scale = built(build).quant_per_token(x)
    check_quant(q, scale, *ref.quant_per_token_ref(x), dtype, exact=True)
    if rows > 2:
        assert scale[1].item() == 1.0 and not q[1].any()


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_quant(rows: int, with_residual: bool, dtype: torch.dtype, build: str) -> None:
    n = 576
    x = strided_rows(rows, n, dtype)
    residual = torch.randn(rows, n, dtype=dtype) if with_residual else None
    weight = torch.randn(n, dtype=dtype)
    q, scale, res = built(build).rms_norm_quant(x, weight, 1e-5, residual)
    ref_q, ref_scale, ref_res = ref.rms_norm_quant_ref(x, weight, 1e-5, residual)
    check_quant(q, scale, ref_q, ref_scale, dtype, exact=False)
    assert torch.equal(res, ref_res)
    if residual is None:
        assert res.data_ptr() == x.data_ptr()  # x itself, as the reference returns it


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [200, 1536])
@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul_quant(rows: int, n: int, dtype: torch.dtype, build: str) -> None:
    x = strided_rows(rows, 2 * n, dtype, 3.0)
    q, scale = built(build).silu_and_mul_quant(x)
    check_quant(q, scale, *ref.silu_and_mul_quant_ref(x), dtype, exact=False)


def int8_operands(rows: int, k: int, n: int) -> tuple[torch.Tensor, ...]:
    """q [rows, k] (strided rows, the full int8 range), q_scale, weight [n, k], weight_scale [n, 1]."""
    q = torch.randint(-128, 128, (rows, k + 5), dtype=torch.int8)[:, 2:2 + k]
    weight = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    if rows:
        q[0] = 127  # the largest sums
        weight[0] = 127
    if rows > 1 and n > 1:  # -128 x -128 (where a 16-bit pair sum would overflow)
        q[1] = -128
        weight[1] = -128
    return q, torch.rand(rows, 1) / 100 + 1e-4, weight, torch.rand(n, 1) / 100 + 1e-4


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kn", [(200, 333), (576, 960), (1536, 576), (7, 5), (3, 17)], ids=str)
@pytest.mark.parametrize("rows", ROWS)
def test_int8_linear(rows: int, kn: tuple[int, int], with_bias: bool, out_dtype: torch.dtype, build: str) -> None:
    kernels = built(build)
    k, n = kn
    q, q_scale, weight, weight_scale = int8_operands(rows, k, n)
    bias = torch.randn(n).to(out_dtype) if with_bias else None
    packed = kernels.pack_int8_weight(weight)
    out = kernels.int8_linear(q, q_scale, packed, weight_scale.reshape(-1) if n % 2 else weight_scale, bias, out_dtype)
    expected = ref.int8_linear_ref(q, q_scale, weight, weight_scale, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (rows, n)
    assert torch.equal(out, expected), (out - expected).abs().max()


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_int8_linear_with_more_threads_than_column_blocks(build: str) -> None:
    kernels = built(build)
    q, q_scale, weight, weight_scale = int8_operands(300, 200, 40)  # 3 blocks of 16 columns
    threads = torch.get_num_threads()
    torch.set_num_threads(8)  # the rows are split too
    try:
        out = kernels.int8_linear(q, q_scale, kernels.pack_int8_weight(weight), weight_scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, ref.int8_linear_ref(q, q_scale, weight, weight_scale))


def test_packed_layout_is_the_same_in_every_build() -> None:
    weight = torch.randint(-128, 128, (333, 202), dtype=torch.int8)
    packed = KERNELS.pack_int8_weight(weight)
    assert packed.shape == (21, 51 + 1, 64) and KERNELS.is_packed_int8(packed)
    blocks = packed[:, :51].reshape(21, 51, 16, 4).permute(0, 2, 1, 3).reshape(21 * 16, 51 * 4)
    assert torch.equal(blocks[:333, :202], weight)
    assert not blocks[333:].any() and not blocks[:, 202:].any()  # zero padding
    sums = packed[:, 51].contiguous().view(torch.int32).reshape(-1)[:333]
    assert torch.equal(sums, 128 * weight.int().sum(1))
    for build in BUILDS:
        if BUILDS[build] is not None:
            assert torch.equal(BUILDS[build].pack_int8_weight(weight), packed), build


def expected_gemm(build: str) -> str | None:
    """The vector int8 GEMM a build should run on this CPU."""
    if build == "portable" or "avx2" not in CPU_FLAGS:
        return None
    vnni = "avx512_vnni" in CPU_FLAGS and build in ("native", "no-avx512bf16")
    return "avx512_vnni" if vnni else "avx2"


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_prepack_packs_only_for_a_vector_gemm(build: str) -> None:
    kernels = built(build)
    weight = torch.randint(-128, 128, (48, 64), dtype=torch.int8)
    assert kernels.int8_gemm_vec == expected_gemm(build)
    prepacked = kernels.prepack_int8_weight(weight)
    if kernels.int8_gemm_vec:
        assert torch.equal(prepacked, kernels.pack_int8_weight(weight))
    else:  # the backend's torch._int_mm path takes it as it is
        assert prepacked is weight


def test_int8_linear_refuses_an_unpacked_weight() -> None:
    q, q_scale, weight, weight_scale = int8_operands(4, 64, 32)
    with pytest.raises(ValueError, match="packed weight"):
        KERNELS.int8_linear(q, q_scale, weight, weight_scale)
    with pytest.raises(ValueError, match="packed weight"):  # packed for another K
        KERNELS.int8_linear(q[:, :60], q_scale, KERNELS.pack_int8_weight(weight), weight_scale)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_backends(out_dtype: torch.dtype) -> None:
    """CpuBackend runs the kernels (a packed weight) or the torch path (a plain one); TorchBackend's
    torch._int_mm path equals the float64 reference."""
    from pdserve.engine.backends.cpu_backend import CpuBackend
    from pdserve.engine.backends.torch_backend import TorchBackend

    cpu, torch_be = CpuBackend(KERNELS), TorchBackend()
    x = torch.randn(37, 576).to(out_dtype)
    q, q_scale, weight, weight_scale = int8_operands(37, 576, 960)
    bias = torch.randn(960).to(out_dtype)
    expected = ref.int8_linear_ref(q, q_scale, weight, weight_scale, bias, out_dtype)
    assert torch.equal(torch_be.int8_linear(q, q_scale, weight, weight_scale, bias, out_dtype), expected)
    assert torch.equal(cpu.int8_linear(q, q_scale, weight, weight_scale, bias, out_dtype), expected)
    packed = KERNELS.pack_int8_weight(weight)
    got = cpu.int8_linear(q, q_scale, packed, weight_scale, bias, out_dtype)
    assert got.dtype == out_dtype
    if out_dtype == torch.float16:  # through float32: within one float16 step
        assert torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-3)
    else:
        assert torch.equal(got, expected)
    # float16 rows take the inherited torch path (the references)
    for got, expected in zip(cpu.quant_per_token(x), ref.quant_per_token_ref(x)):
        assert torch.equal(got, expected)
    residual, weight = torch.randn_like(x), torch.randn(576).to(out_dtype)
    pairs = ((cpu.rms_norm_quant(x, weight, 1e-6, residual), ref.rms_norm_quant_ref(x, weight, 1e-6, residual)),
             (cpu.silu_and_mul_quant(x), ref.silu_and_mul_quant_ref(x)))
    for got, expected in pairs:
        rtol, steps = fused_quant_bounds(out_dtype)
        assert (got[0].int() - expected[0].int()).abs().max() <= steps
        assert torch.allclose(got[1], expected[1], rtol=rtol, atol=0)
