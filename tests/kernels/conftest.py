"""Kernel test setup: CPU interpreter switch, device, fresh seeds and the error check.

Owns: choosing where the Triton kernels run. Without a CUDA device they run under
Triton's CPU interpreter, which must be switched on before any ``@triton.jit``
function is defined, i.e. before ``kernels.*`` is imported by a test module.
Tests marked ``gpu`` (bigger shapes) are skipped without CUDA.
"""
from __future__ import annotations

import os
import secrets
from typing import Any, Callable

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# Relative-error bound per output dtype (float32 result vs a float32/64 reference).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if not HAS_CUDA and "gpu" in item.keywords and str(item.path).startswith(here):
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def seed() -> int:
    """A fresh seed per test (inputs differ every run); failures print it."""
    value = secrets.randbits(31)
    torch.manual_seed(value)
    return value


@pytest.fixture
def check_close(seed: int) -> Callable[..., None]:
    """check_close(out, ref, dtype[, what, tol]): finite, and ||out - ref|| / ||ref|| under
    dtype's bound (or ``tol``)."""

    def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output",
              tol: float | None = None) -> None:
        assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
        bad = (~torch.isfinite(out64)).sum().item()
        assert bad == 0, f"{what}: {bad} non-finite elements (unwritten or NaN), seed={seed}"
        err = ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
        bound = TOLERANCE[dtype] if tol is None else tol
        assert err < bound, f"{what}: relative error {err:.3e} >= {bound:g}, seed={seed}"

    return check


def capture_without_sync(step: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``step`` once with host syncs forbidden (one raises), once on a side stream, then
    capture it: (the graph, what the captured call returned)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
