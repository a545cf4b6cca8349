"""``gemv`` against a float64 matmul: one row times an nn.Linear weight."""
from __future__ import annotations

import pytest
import torch

from pdserve.kernels.gemv import gemv

SIZES = ["small", pytest.param("large", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,k", [(24, 40), (64, 600), (7, 1030)])
def test_gemv(n: int, k: int, dtype: torch.dtype, size: str, device: torch.device, check_close) -> None:
    if size == "large":
        n, k = n * 256, k * 16
    x = torch.randn(1, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device)
    out = gemv(x, w, block_k=256 if size == "small" else 512)
    assert out.shape == (1, n) and out.dtype == dtype
    check_close(out, x.double() @ w.double().T, dtype)


def test_gemv_rejects_bad_shapes(device: torch.device) -> None:
    with pytest.raises(ValueError, match="expected x"):
        gemv(torch.randn(2, 8, device=device), torch.randn(4, 8, device=device))
    with pytest.raises(ValueError, match="expected x"):
        gemv(torch.randn(1, 8, device=device), torch.randn(4, 9, device=device))
