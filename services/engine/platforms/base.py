"""The ``Platform`` protocol: device creation, memory, synchronisation, graphs, backend.

Owns: the interface only. A platform is stateless (it may cache device properties);
the engine asks it once at start-up for its device, backend and memory, and the
model runner asks it to capture and replay step graphs where ``supports_graphs``.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, TypeVar

import torch

from pdserve.engine.backends.base import Backend

T = TypeVar("T")


class Graph(Protocol):
    """A captured sequence of device work; ``replay`` reruns it on the same buffers."""

    def replay(self) -> None: ...


class Platform(Protocol):
    device_type: str
    supports_graphs: bool  # whether ``capture_graph`` works
    pin_memory: bool  # whether host staging buffers should be page-locked for async copies
    asynchronous: bool  # whether device work runs behind the host (then host work can overlap it)
    cache_tokens_per_seq: int  # automatic KV sizing: context tokens reserved per batch slot

    def device(self, index: int = 0) -> torch.device:
        """The torch device the engine allocates on."""

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        """(free, total) bytes of the memory the KV cache is allocated from."""

    def synchronize(self, device: torch.device) -> None:
        """Wait until all queued work on the device is done."""

    def new_event(self, enable_timing: bool = False) -> Any:
        """An event with ``record()``, ``query()`` (True once the work queued before it
        has run), ``synchronize()`` and ``elapsed_time(other)`` (ms)."""

    def graph_pool(self) -> Any:
        """A memory pool that several captured graphs share (they never run concurrently)."""

    def capture_graph(self, fn: Callable[[], T], pool: Any) -> tuple[Graph, T]:
        """Capture ``fn()`` once; returns the graph and fn's output, which every replay rewrites.

        NOTE: fn must read its inputs from (and write them to) buffers that outlive the
        graph, and must not synchronise with the host.
        """

    def backend(self, compiled_cpu_kernels: bool = True) -> Backend:
        """The compute backend for this device family (``compiled_cpu_kernels``: the CPU
        platform's choice between its compiled kernels and pure torch; others ignore it)."""
