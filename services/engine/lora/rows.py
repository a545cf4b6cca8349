"""Each token's LoRA adapter slot for the current step, in device buffers a captured graph reads.

Owns: one int32 device buffer, allocated once for ``max_tokens`` tokens and ``num_slots``
slots, laid out ``slot_start [S] | slot_count [S] | slot_rank [S] | token_slots [max_tokens] |
sorted_tokens [max_tokens]`` (``kernels/reference.py``: ``group_by_slot``); the host copy of
each slot's adapter rank (``set_rank``, so the kernels that can skip the zero padding of the
stacks past it do); the ``LoRAMapping`` views of the buffer per token count; whether the
wrapped layers add deltas this step.

Lifecycle: ``StepRows(...)`` with the rank's ``AdapterSlots`` -> ``capturing()`` around
the capture of decode graphs (every wrapped layer launches its delta kernels, which read
the buffer: all slots -1 then) -> per step ``write(token_slots)`` before the forward:
one host-to-device copy of the whole buffer (page-locked on accelerators, queued on the
stream, so a step still running reads its own slots), token slots past the step's tokens
-1, so a graph's padding rows get no delta; none in a step without adapter tokens ->
``mapping(T)`` from each wrapped layer.

NOTE: eager steps without any adapter token skip the delta (``mapping`` is None then); a
graph replays its captured kernels whatever the slots, and they do nothing for slot -1.
A step of more than ``max_tokens`` tokens (never a captured decode step: ``max_tokens``
covers the largest graph) gets buffers of its own for that step.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from pdserve.engine.backends.base import LoRAMapping
from pdserve.kernels.reference import group_by_slot


class StepRows:
    """The step's token slots, in one device buffer that outlives every step and graph."""

    def __init__(self, num_slots: int, max_tokens: int, device: torch.device, pin_memory: bool):
        self.num_slots, self.max_tokens = num_slots, max_tokens
        self._device, self._pin = device, pin_memory
        self._ranks = torch.zeros(num_slots, dtype=torch.int32)  # host: each slot's adapter rank
        with torch.inference_mode():  # NOTE: written inside steps' inference mode only
            self._buffer = self._layout(torch.empty(0, dtype=torch.int32), max_tokens).to(device)
        self._views: dict[int, LoRAMapping] = {}
        self._step: LoRAMapping | None = None  # None: no token of this step has an adapter
        self._capturing = False

    def mapping(self, num_tokens: int) -> LoRAMapping | None:
        """The slots of the step's ``num_tokens`` tokens; None when no delta is to be added.

        NOTE: a padded batch (more rows than the step has tokens, as a replayed graph has)
        reads the graphs' buffer, whose rows past the step's tokens are -1.
        """
        padded = self._step is not None and num_tokens != self._step.token_slots.shape[0]
        if not (self._capturing or padded):
            return self._step
        if num_tokens > self.max_tokens:
            raise ValueError(f"{num_tokens} rows, but the slot buffers hold {self.max_tokens}")
        return self._view(self._buffer, self.max_tokens, num_tokens)

    @property
    def active(self) -> bool:
        """Whether some token of the step has an adapter."""
        return self._step is not None

    def set_rank(self, slot: int, rank: int) -> None:
        """The rank of the adapter now in ``slot`` (0: none); the device copy follows with the
        next step that has adapter tokens (no step reads it before)."""
        self._ranks[slot] = rank

    @torch.inference_mode()
    def write(self, token_slots: torch.Tensor) -> None:
        """This step's slot per token (host int32 [n], -1 = the base model)."""
        n = token_slots.numel()
        if not bool((token_slots >= 0).any()):
            # NOTE: nothing reads the buffer in such a step (eager layers skip the delta, and the
            # runner replays the graphs captured without adapter kernels), so it is not copied
            self._step = None
            return
        if n > self.max_tokens:  # NOTE: an eager step only; the graphs' buffer stays as it is
            self._step = self._view(self._layout(token_slots, n).to(self._device), n, n, cache=False)
            return
        self._fill(token_slots)
        self._step = self._view(self._buffer, self.max_tokens, n)

    def _fill(self, token_slots: torch.Tensor) -> None:
        host = self._layout(token_slots, self.max_tokens)
        if self._pin:
            host = host.pin_memory()
        self._buffer.copy_(host, non_blocking=self._pin)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """While graphs are captured: every wrapped layer launches its kernels, on no adapter token."""
        with torch.inference_mode():
            self._fill(torch.empty(0, dtype=torch.int32))
        self._step = None
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def _layout(self, token_slots: torch.Tensor, size: int) -> torch.Tensor:
        """The host buffer of ``token_slots`` for ``size`` tokens (slots past them -1)."""
        s, n = self.num_slots, token_slots.numel()
        host = torch.full((3 * s + 2 * size,), -1, dtype=torch.int32)
        sorted_tokens, start, count = group_by_slot(token_slots, s)
        host[:s], host[s:2 * s], host[2 * s:3 * s] = start, count, self._ranks
        host[3 * s:3 * s + n] = token_slots
        host[3 * s + size:3 * s + size + n] = sorted_tokens
        return host

    def _view(self, buffer: torch.Tensor, size: int, num_tokens: int, cache: bool = True) -> LoRAMapping:
        view = self._views.get(num_tokens) if cache else None
        if view is None:
            s = self.num_slots
            view = LoRAMapping(token_slots=buffer[3 * s:3 * s + num_tokens],
                               sorted_tokens=buffer[3 * s + size:3 * s + size + num_tokens],
                               slot_start=buffer[:s], slot_count=buffer[s:2 * s], slot_rank=buffer[2 * s:3 * s])
            if cache:
                self._views[num_tokens] = view
        return view


__all__ = ["StepRows"]
