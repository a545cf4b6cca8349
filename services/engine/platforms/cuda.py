"""The CUDA platform: NVIDIA GPUs through torch.cuda, CUDA graphs, the Triton backend.

Owns nothing across calls. Graphs are ``torch.cuda.CUDAGraph`` captured on torch's
side stream into a caller-given pool.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from pdserve.engine.backends.base import Backend


class CudaPlatform:
    device_type = "cuda"
    supports_graphs = True
    pin_memory = True
    asynchronous = True
    cache_tokens_per_seq = 4096

    def device(self, index: int = 0) -> torch.device:
        if not torch.cuda.is_available():
            raise ValueError("device_type='cuda' but torch sees no CUDA device")
        return torch.device("cuda", index)

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        return torch.cuda.mem_get_info(device)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def new_event(self, enable_timing: bool = False) -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=enable_timing)

    def graph_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def capture_graph(self, fn: Callable[[], Any], pool: Any) -> tuple[torch.cuda.CUDAGraph, Any]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph, out

    def backend(self, compiled_cpu_kernels: bool = True) -> Backend:
        try:
            from pdserve.engine.backends.triton_backend import TritonBackend
        except ImportError as exc:  # triton missing
            raise ValueError(f"device_type='cuda' needs triton: {exc}") from exc
        return TritonBackend()
