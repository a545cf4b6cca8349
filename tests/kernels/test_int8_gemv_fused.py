"""``kernels/int8_gemv_fused.py`` against the unfused ops it replaces, bit for bit.

``int8_gemv_dynamic(x)`` must equal ``quant_per_token(x)`` then ``int8_gemv``, and
``int8_gemv_silu`` then ``int8_gemv_dynamic(h, amax)`` must equal ``int8_gemv`` (gate_up),
``silu_and_mul_quant``, ``int8_gemv`` (down): the same scales, roundings and int32 sums.
On CPU the kernels run under Triton's interpreter (words unpacked with shifts); the dp4a
path on a GPU (the ``gpu`` cases, Llama-3-8B shapes).
"""
from __future__ import annotations

import pytest
import torch

from pdserve.kernels.int8 import quant_per_token, silu_and_mul_quant
from pdserve.kernels.int8_gemv import int8_gemv
from pdserve.kernels.int8_gemv_fused import FusedGemvConfig, fusable, int8_gemv_dynamic, int8_gemv_silu

from .conftest import capture_without_sync

DTYPES = [torch.float32, torch.bfloat16]  # float16 rounds like bfloat16 here; one case below
SMALL = FusedGemvConfig(block_n=8, block_k=256)  # 64 words a step: K = 516 takes two and a tail
# (N, K): N not a multiple of block_n, K with a tail step, K of one word's step
SHAPES = [(40, 256), (17, 100), (33, 516), (8, 4)]


def _weights(n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device),
            torch.rand(n, device=device) * 0.02 + 1e-3)


def _unfused_linear(x, w, w_scale, bias):
    q, s = quant_per_token(x)
    return int8_gemv(q, s, w, w_scale, bias, x.dtype)


def _unfused_mlp(q, q_scale, w13, s13, w2, s2, dtype):
    h_q, h_scale = silu_and_mul_quant(int8_gemv(q, q_scale, w13, s13, None, dtype))
    return int8_gemv(h_q, h_scale, w2, s2, None, dtype)


@pytest.mark.parametrize("with_amax", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3])
def test_dynamic_equals_quantize_then_gemv(m, n, k, dtype, with_amax, device, seed):
    x = (torch.randn(m, k, device=device) * 3).to(dtype)
    x[0, : min(k, 5)] = 0  # zeros quantize to 0
    w, w_scale = _weights(n, k, device)
    bias = torch.randn(n, device=device).to(dtype)
    amax = x.float().abs().amax(dim=1) if with_amax else None
    got = int8_gemv_dynamic(x, w, w_scale, bias, amax, config=SMALL)
    assert torch.equal(got, _unfused_linear(x, w, w_scale, bias)), f"seed={seed}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3])
def test_silu_then_dynamic_equals_the_unfused_mlp(m, n, k, dtype, device, seed):
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    q_scale = torch.rand(m, 1, device=device) * 0.02 + 1e-3
    w13, s13 = _weights(2 * n, k, device)
    w2, s2 = _weights(k, n, device)  # down: [K, I]; I % 4 != 0 cannot be fused
    h, amax = int8_gemv_silu(q, q_scale, w13, s13, dtype, config=SMALL)
    assert h.shape == (m, n) and h.dtype == dtype
    assert torch.equal(amax, h.float().abs().amax(dim=1)), f"seed={seed}"
    if fusable(w2):
        got = int8_gemv_dynamic(h, w2, s2, None, amax, config=SMALL)
        assert torch.equal(got, _unfused_mlp(q, q_scale, w13, s13, w2, s2, dtype)), f"seed={seed}"


def test_float16_and_four_rows(device, seed):
    x = torch.randn(4, 256, device=device).to(torch.float16)
    w, w_scale = _weights(24, 256, device)
    assert torch.equal(int8_gemv_dynamic(x, w, w_scale, config=SMALL), _unfused_linear(x, w, w_scale, None))
    q = torch.randint(-127, 128, (4, 256), dtype=torch.int8, device=device)
    q_scale = torch.rand(4, 1, device=device) * 0.02 + 1e-3
    w13, s13 = _weights(48, 256, device)
    w2, s2 = _weights(256, 24, device)
    h, amax = int8_gemv_silu(q, q_scale, w13, s13, torch.float16, config=SMALL)
    got = int8_gemv_dynamic(h, w2, s2, None, amax, config=SMALL)
    assert torch.equal(got, _unfused_mlp(q, q_scale, w13, s13, w2, s2, torch.float16)), f"seed={seed}"


def test_zero_rows_and_a_zero_row(device):
    w, w_scale = _weights(16, 64, device)
    assert int8_gemv_dynamic(torch.empty(0, 64, device=device), w, w_scale).shape == (0, 16)
    x = torch.zeros(2, 64, device=device)  # scale 1, q 0: the bias alone
    bias = torch.randn(16, device=device)
    torch.testing.assert_close(int8_gemv_dynamic(x, w, w_scale, bias, config=SMALL), bias.expand(2, 16))
    q = torch.zeros(1, 64, dtype=torch.int8, device=device)
    h, amax = int8_gemv_silu(q, torch.ones(1, 1, device=device), *_weights(32, 64, device), torch.float32)
    assert torch.equal(h, torch.zeros(1, 16, device=device)) and amax.item() == 0.0


def test_rejects(device):
    w, w_scale = _weights(16, 64, device)
    x = torch.randn(5, 64, device=device)
    with pytest.raises(ValueError, match="at most 4 rows"):
        int8_gemv_dynamic(x, w, w_scale)
    with pytest.raises(ValueError, match="K % 4"):
        int8_gemv_dynamic(x[:1, :63], w[:, :63], w_scale)
    with pytest.raises(ValueError, match="amax"):
        int8_gemv_dynamic(x[:2], w, w_scale, amax=torch.ones(3, device=device))
    with pytest.raises(ValueError, match="must be int8"):
        int8_gemv_silu(x[:1], torch.ones(1, 1, device=device), w, w_scale)
    with pytest.raises(ValueError, match="gate rows"):
        int8_gemv_silu(w[:1], torch.ones(1, 1, device=device), w[:15], w_scale[:15])
    assert not fusable(w[:, 1:]) and fusable(w)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2])
def test_llama_shapes_with_the_default_launch_shape(m, device, seed):
    x = torch.randn(m, 4096, dtype=torch.bfloat16, device=device)
    w, w_scale = _weights(4096, 4096, device)
    assert torch.equal(int8_gemv_dynamic(x, w, w_scale), _unfused_linear(x, w, w_scale, None)), f"seed={seed}"
    q = torch.randint(-127, 128, (m, 4096), dtype=torch.int8, device=device)
    q_scale = torch.rand(m, 1, device=device) * 0.01 + 1e-4
    w13, s13 = _weights(2 * 14336, 4096, device)
    w2, s2 = _weights(4096, 14336, device)
    h, amax = int8_gemv_silu(q, q_scale, w13, s13, torch.bfloat16)
    got = int8_gemv_dynamic(h, w2, s2, None, amax)
    assert torch.equal(got, _unfused_mlp(q, q_scale, w13, s13, w2, s2, torch.bfloat16)), f"seed={seed}"


@pytest.mark.gpu
def test_fused_gemvs_capture_in_a_cuda_graph(device, seed):
    q = torch.randint(-127, 128, (1, 512), dtype=torch.int8, device=device)
    q_scale = torch.full((1, 1), 0.01, device=device)
    w13, s13 = _weights(2048, 512, device)
    w2, s2 = _weights(512, 1024, device)

    def step() -> torch.Tensor:
        h, amax = int8_gemv_silu(q, q_scale, w13, s13, torch.bfloat16)
        return int8_gemv_dynamic(h, w2, s2, None, amax)

    graph, out = capture_without_sync(step)
    q.copy_(torch.randint_like(q, -127, 128))
    graph.replay()  # the max buffer starts from zero again on every replay
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, _unfused_mlp(q, q_scale, w13, s13, w2, s2, torch.bfloat16)), f"seed={seed}"
