"""``rms_norm`` against ``reference.rms_norm_ref`` on float64-upcast inputs."""
from __future__ import annotations

import pytest
import torch

from pdserve.kernels.norm import rms_norm
from pdserve.kernels.reference import rms_norm_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = ["small", pytest.param("large", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [576, 1024, 4096])
def test_rms_norm(hidden: int, dtype: torch.dtype, with_residual: bool, size: str,
                  device: torch.device, check_close) -> None:
    rows = 7 if size == "small" else 3000
    x = torch.randn(rows, hidden, dtype=dtype, device=device) * 3
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    residual = torch.randn(rows, hidden, dtype=dtype, device=device) if with_residual else None
    out = torch.full((rows, hidden), float("nan"), dtype=dtype, device=device)
    res_out = torch.full_like(out, float("nan")) if with_residual else None
    got, new_res = rms_norm(x, weight, 1e-5, residual, out=out, residual_out=res_out)
    assert got.data_ptr() == out.data_ptr()
    ref, ref_res = rms_norm_ref(x.double(), weight.double(), 1e-5,
                                None if residual is None else residual.double())
    check_close(got, ref, dtype, "normed")
    check_close(new_res, ref_res, dtype, "residual")


def test_rms_norm_in_place_residual(device: torch.device, check_close) -> None:
    x = torch.randn(5, 576, dtype=torch.bfloat16, device=device)
    residual = torch.randn_like(x)
    weight = torch.randn(576, dtype=torch.bfloat16, device=device)
    ref, ref_res = rms_norm_ref(x, weight, 1e-6, residual.clone())
    out, new_res = rms_norm(x, weight, 1e-6, residual, residual_out=residual)
    assert new_res.data_ptr() == residual.data_ptr()
    check_close(new_res, ref_res, torch.bfloat16, "residual")
    check_close(out, ref, torch.bfloat16, "normed")


def test_rms_norm_fp32_weight_promotes(device: torch.device, check_close) -> None:
    x = torch.randn(3, 64, dtype=torch.bfloat16, device=device)
    weight = torch.randn(64, device=device)
    out, _ = rms_norm(x, weight, 1e-6)
    ref, _ = rms_norm_ref(x, weight, 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    check_close(out, ref, torch.bfloat16)  # the normalised value is rounded to bfloat16 first
