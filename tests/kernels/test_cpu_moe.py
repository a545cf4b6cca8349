"""The compiled CPU experts of a sparse MLP (kernels/cpu.py ``moe_experts`` over
``prepack_expert_weights``, through ``CpuBackend.fused_moe``) against the float64 reference
and the one-expert-at-a-time path.

Every build is tested (native, and portable C where the experts run through the plain
linear GEMM one by one). Cases: top-k 1/2/8 over 4 to 128 experts, experts with no pairs
(the usual case at decode sizes), one token and many, sizes not a multiple of the 16-column
blocks, float32 and bfloat16.
"""
from __future__ import annotations

import pytest
import torch

from pdserve.engine.backends.cpu_backend import CpuBackend
from pdserve.kernels.reference import fused_moe_ref
from tests.kernels.cpu_builds import AVX2, PORTABLE, builds, built as built_kernels

BUILDS = builds({"portable": PORTABLE, "avx2": AVX2})
DTYPES = [torch.float32, torch.bfloat16]
CASES = [  # tokens, experts, top_k, hidden, inter
    (1, 8, 2, 64, 48),
    (5, 4, 1, 40, 24),
    (3, 128, 8, 64, 32),  # most experts get no pair
    (37, 16, 4, 100, 72),  # columns past the last full block of 16
    (64, 60, 4, 48, 40),
]

pytestmark = pytest.mark.skipif(BUILDS["native"] is None, reason="no C compiler to build the CPU kernels")


def _backend(build: str) -> CpuBackend:
    backend = CpuBackend.__new__(CpuBackend)  # NOTE: the backend of one given build, not the default one
    backend.kernels = built_kernels(BUILDS, build)
    return backend


def _moe(tokens: int, experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype):
    x = torch.randn(tokens, hidden).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter) / inter ** 0.5).to(dtype)
    ids = torch.rand(tokens, experts).argsort(dim=1)[:, :top_k]
    weights = torch.softmax(torch.randn(tokens, top_k), dim=-1)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_packed_experts_match_the_reference(case, dtype: torch.dtype, build: str) -> None:
    backend = _backend(build)
    x, w13, w2, weights, ids = _moe(*case, dtype)
    packed13, packed2 = backend.prepare_expert_weights(w13), backend.prepare_expert_weights(w2)
    assert backend.kernels.is_packed_experts(packed13) == (dtype in backend.kernels.linear_vec)
    got = backend.fused_moe(x, packed13, packed2, weights, ids)
    exact = fused_moe_ref(x.double(), w13.double(), w2.double(), weights, ids)
    one_by_one = backend.fused_moe(x, w13, w2, weights, ids)  # plain weights: the per-expert path
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    scale = exact.abs().max().item()
    assert got.dtype == dtype and got.shape == x.shape
    assert (got.double() - exact).abs().max().item() <= tol * scale
    assert (got.double() - one_by_one.double()).abs().max().item() <= tol * scale


def test_packed_experts_as_the_kernels_see_them() -> None:
    kernels = built_kernels(BUILDS, "native")
    if torch.float32 not in kernels.linear_vec:
        pytest.skip("float32 linear is not vectorized in this build")
    w = torch.randn(3, 40, 24)
    packed = kernels.prepack_expert_weights(w)
    assert packed.shape == (3, 40, 24, 1) and kernels.is_packed_experts(packed)
    for e in range(3):
        assert torch.equal(kernels.unpack_linear_weight(packed[e], 24), w[e])
    with pytest.raises(ValueError, match="moe_experts operands"):
        kernels.moe_experts(torch.randn(2, 24), torch.zeros(3, dtype=torch.int32), packed,
                            kernels.prepack_expert_weights(torch.randn(3, 24, 20)))
