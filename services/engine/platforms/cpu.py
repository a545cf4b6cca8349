"""The CPU platform: host memory, no streams, no graphs; the CPU backend (compiled kernels over the torch reference).

Owns nothing across calls. Host memory figures come from ``sysconf``.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch

from pdserve.engine.backends.base import Backend


class HostEvent:
    """A wall-clock stand-in for a device event (CPU work is synchronous)."""

    def __init__(self) -> None:
        self.t = 0.0

    def record(self, stream: Any = None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True  # NOTE: CPU work recorded before this event has already run

    def elapsed_time(self, end: "HostEvent") -> float:
        return (end.t - self.t) * 1e3


class CpuPlatform:
    device_type = "cpu"
    supports_graphs = False
    pin_memory = False
    asynchronous = False
    cache_tokens_per_seq = 1024  # keep the resident cache small on the host

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def synchronize(self, device: torch.device) -> None:
        pass

    def new_event(self, enable_timing: bool = False) -> HostEvent:
        return HostEvent()

    def graph_pool(self) -> None:
        return None

    def capture_graph(self, fn: Callable[[], Any], pool: Any) -> tuple[Any, Any]:
        raise NotImplementedError("the CPU platform has no graphs; run steps eagerly")

    def backend(self, compiled_cpu_kernels: bool = True) -> Backend:
        """pdserve's compiled kernels where a C compiler can build them, else pure torch."""
        from pdserve.engine.backends.torch_backend import TorchBackend

        if compiled_cpu_kernels:
            from pdserve.kernels.cpu import load_cpu_kernels
            from pdserve.engine.backends.cpu_backend import CpuBackend

            kernels = load_cpu_kernels()
            if kernels is not None:
                return CpuBackend(kernels)
        return TorchBackend()
