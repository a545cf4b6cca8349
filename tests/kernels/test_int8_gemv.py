"""``int8_gemv`` (``kernels/int8_gemv.py``) against ``int8_linear_ref`` and ``int8_gemm``.

The int32 sums are exact on every path and the epilogue is ``int8_gemm``'s, so the output
must equal ``int8_gemm``'s bit for bit and the float64 reference up to the float32
epilogue and the final rounding (``check_gemm``). On CPU the kernels run under Triton's
interpreter (the portable paths: words unpacked with shifts, or single bytes); the dp4a
path runs on a GPU only (the ``gpu`` cases).
"""
from __future__ import annotations

import pytest
import torch

from pdserve.kernels.int8 import int8_gemm
from pdserve.kernels.int8_gemv import Int8GemvConfig, default_gemv_config, gemv_k_splits, int8_gemv

from .test_int8 import _gemm_inputs, check_gemm
from .conftest import capture_without_sync

GPU = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, K, block_k): N not a multiple of block_n, K not a multiple of block_k (a K tail),
# K % 4 != 0 (the byte path). Steps of 16-256 words on CPU, so loops, tails and slices run.
SHAPES = [(33, 80, 64), (100, 256, 128), (64, 4100, 1024), (40, 70, 64)]
SMALL = dict(block_n=16, block_k=64)


def _check_both(out: torch.Tensor, q: torch.Tensor, q_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, seed: int) -> None:
    check_gemm(out, q, q_scale, w, w_scale, bias, out_dtype, seed)
    expect = int8_gemm(q, q_scale, w, w_scale, bias, out_dtype)
    assert torch.equal(out, expect), f"differs from int8_gemm, seed={seed}"


def _run_case(m: int, n: int, k: int, block_k: int, out_dtype: torch.dtype, with_bias: bool, split_k: int,
              device: torch.device, seed: int) -> None:
    q, q_scale, w, w_scale, bias = _gemm_inputs(m, n, k, device, out_dtype if with_bias else None)
    out = int8_gemv(q, q_scale, w, w_scale, bias, out_dtype, block_n=16, block_k=block_k, split_k=split_k)
    _check_both(out, q, q_scale, w, w_scale, bias, out_dtype, seed)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n,k,block_k", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_int8_gemv(m: int, n: int, k: int, block_k: int, with_bias: bool, split_k: int,
                   device: torch.device, seed: int) -> None:
    _run_case(m, n, k, block_k, torch.float32, with_bias, split_k, device, seed)


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3])
def test_int8_gemv_out_dtypes(m: int, out_dtype: torch.dtype, with_bias: bool, split_k: int,
                              device: torch.device, seed: int) -> None:
    """The epilogue's rounding per output dtype, in one piece and summed from K slices."""
    _run_case(m, 33, 80, 64, out_dtype, with_bias, split_k, device, seed)


@pytest.mark.parametrize("cfg", [
    Int8GemvConfig(block_n=4, block_k=32, num_warps=2, split_k=2),   # two words per step
    Int8GemvConfig(block_n=32, block_k=128, num_warps=8, split_k=4),
    Int8GemvConfig(block_n=8, block_k=32, split_k=0),                 # K slices from the shape
    Int8GemvConfig(block_n=16, block_k=64, split_k=99),               # more slices than steps
], ids=["bn4_bk32", "bn32_bk128", "auto_split", "split99"])
@pytest.mark.parametrize("m,n,k", [(1, 50, 300), (4, 19, 512), (3, 24, 98)])
def test_int8_gemv_configs(m: int, n: int, k: int, cfg: Int8GemvConfig, device: torch.device, seed: int) -> None:
    q, q_scale, w, w_scale, bias = _gemm_inputs(m, n, k, device, torch.float32)
    out = torch.full((m, n), float("nan"), dtype=torch.float32, device=device)
    got = int8_gemv(q, q_scale, w, w_scale, bias, torch.float32, out=out, block_n=cfg.block_n,
                    block_k=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, split_k=cfg.split_k)
    assert got.data_ptr() == out.data_ptr()
    _check_both(got, q, q_scale, w, w_scale, bias, torch.float32, seed)


def test_int8_gemv_unaligned_and_edges(device: torch.device, seed: int) -> None:
    """Rows not 4-byte aligned (the byte path), strided q, weight_scale [N, 1], K = 0, M = 0."""
    q, q_scale, w, w_scale, bias = _gemm_inputs(2, 24, 64, device, torch.float32)
    w_off = torch.randint(-127, 128, (24, 65), dtype=torch.int8, device=device)[:, 1:]  # offset 1, stride 65
    q_off = torch.randint(-127, 128, (2, 66), dtype=torch.int8, device=device)[:, 2:]  # offset 2, stride 66
    for qq, ww in ((q_off, w), (q, w_off), (q_off, w_off)):
        _check_both(int8_gemv(qq, q_scale, ww, w_scale, bias, torch.float32, **SMALL),
                    qq, q_scale, ww, w_scale, bias, torch.float32, seed)
    strided = torch.randint(-127, 128, (2, 128), dtype=torch.int8, device=device)[:, ::2]  # copied first
    _check_both(int8_gemv(strided, q_scale, w, w_scale, None, torch.float32, **SMALL),
                strided, q_scale, w, w_scale, None, torch.float32, seed)
    out = int8_gemv(q, q_scale, w, w_scale.reshape(-1, 1), None, torch.float32, **SMALL)
    _check_both(out, q, q_scale, w, w_scale, None, torch.float32, seed)
    q0, s0, w0, ws0, b0 = _gemm_inputs(3, 40, 0, device, torch.float32)
    torch.testing.assert_close(int8_gemv(q0, s0, w0, ws0, b0, torch.float32), b0.expand(3, 40))  # the bias alone
    assert int8_gemv(q[:0], q_scale[:0], w, w_scale).shape == (0, 24)


def test_int8_gemv_rejects(device: torch.device) -> None:
    q, q_scale, w, w_scale, _ = _gemm_inputs(5, 16, 32, device, None)
    with pytest.raises(ValueError, match="at most 4 rows"):
        int8_gemv(q, q_scale, w, w_scale)
    q, q_scale = q[:2], q_scale[:2]
    with pytest.raises(ValueError, match="int8"):
        int8_gemv(q.float(), q_scale, w, w_scale)
    with pytest.raises(ValueError, match="expected q"):
        int8_gemv(q, q_scale, w[:, :16], w_scale)
    with pytest.raises(ValueError, match="expected q"):
        int8_gemv(q[0], q_scale, w, w_scale)
    with pytest.raises(ValueError, match="q_scale needs"):
        int8_gemv(q, q_scale, w, w_scale[:8])
    with pytest.raises(ValueError, match="out must be"):
        int8_gemv(q, q_scale, w, w_scale, out=torch.empty(2, 16, device=device))  # float32, bf16 asked
    with pytest.raises(ValueError, match="powers of two"):
        int8_gemv(q, q_scale, w, w_scale, block_k=96)
    with pytest.raises(ValueError, match="powers of two"):
        int8_gemv(q, q_scale, w, w_scale, block_k=2)


def test_k_splits(device: torch.device) -> None:
    cfg = Int8GemvConfig(block_n=16, block_k=1024, split_k=4)
    assert gemv_k_splits(cfg, 4096, 4096, device) == 4          # 4 steps of 256 words
    assert gemv_k_splits(cfg, 4096, 2048, device) == 2          # capped at one slice per step
    assert gemv_k_splits(cfg, 4096, 4100, device) == 3          # 5 steps: slices of 2, 2, 1
    assert gemv_k_splits(Int8GemvConfig(split_k=1), 16, 4096, device) == 1
    cfg = default_gemv_config(1, 4, 16384, device)              # one tile: fewer than the multiprocessors
    assert gemv_k_splits(cfg, 4, 16384, device) > 1


@GPU
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1024, 4096), (1000, 4000), (512, 4098)])
def test_int8_gemv_large(m: int, n: int, k: int, device: torch.device, seed: int) -> None:
    """Llama-3-8B shapes and odd ones at the default launch shape: the dp4a path (K = 4098:
    the byte path), with and without K slices."""
    q, q_scale, w, w_scale, bias = _gemm_inputs(m, n, k, device, torch.bfloat16)
    q_scale /= 4  # keep bf16-sized outputs at K = 14336
    for split_k in (None, 1, 3):
        out = int8_gemv(q, q_scale, w, w_scale, bias, torch.bfloat16, split_k=split_k)
        _check_both(out, q, q_scale, w, w_scale, bias, torch.bfloat16, seed)


@GPU
def test_int8_gemv_cuda_graph_no_sync(device: torch.device, seed: int) -> None:
    """int8_gemv (with K slices and without) captures in a CUDA graph and never syncs."""
    q, q_scale, w, w_scale, bias = _gemm_inputs(2, 1024, 4096, device, torch.bfloat16)
    for split_k in (1, 4):
        def step() -> torch.Tensor:
            return int8_gemv(q, q_scale, w, w_scale, bias, torch.bfloat16, split_k=split_k)

        graph, out = capture_without_sync(step)
        q.copy_(torch.randint_like(q, -127, 128))
        graph.replay()
        torch.cuda.synchronize()
        _check_both(out, q, q_scale, w, w_scale, bias, torch.bfloat16, seed)
