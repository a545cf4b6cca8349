"""``silu_and_mul`` against ``reference.silu_and_mul_ref`` on float64-upcast inputs."""
from __future__ import annotations

import pytest
import torch

from pdserve.kernels.activation import silu_and_mul
from pdserve.kernels.reference import silu_and_mul_ref

SIZES = ["small", pytest.param("large", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("inter", [64, 1536, 3000])
def test_silu_and_mul(inter: int, dtype: torch.dtype, size: str, device: torch.device,
                      check_close) -> None:
    rows = 5 if size == "small" else 4096
    # A strided row view: the kernel must honour the row stride.
    x = (torch.randn(rows, 2 * inter + 8, dtype=dtype, device=device) * 4)[:, 8:]
    out = torch.full((rows, inter), float("nan"), dtype=dtype, device=device)
    got = silu_and_mul(x, out=out)
    assert got.data_ptr() == out.data_ptr()
    check_close(got, silu_and_mul_ref(x.double()), dtype)


def test_silu_and_mul_allocates(device: torch.device, check_close) -> None:
    x = torch.randn(3, 128, device=device)
    check_close(silu_and_mul(x), silu_and_mul_ref(x.double()), torch.float32)
