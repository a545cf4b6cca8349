"""Choose the backend for a device type: one place, so new platforms add one entry."""
from __future__ import annotations

from services.engine.backends.base import Backend


def select_backend(device_type: str) -> Backend:
    if device_type == "cpu":
        from services.engine.backends.torch_backend import TorchBackend
        return TorchBackend()
    if device_type == "cuda":
        try:
            from services.engine.backends.triton_backend import TritonBackend
        except ImportError as exc:  # triton missing: stay correct, if slower
            raise ValueError(f"device_type='cuda' needs triton: {exc}") from exc
        return TritonBackend()
    raise ValueError(f"device_type={device_type!r} has no backend; supported: cpu, cuda")
