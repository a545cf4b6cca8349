"""Which of the registered LoRA adapters sit in the ranks' device slots (the scheduler's side).

Owns: ``AdapterResidency``: the map adapter -> device slot for ``max_loras`` slots, in
least-recently-used order, the swaps decided since the last step (each step's plan
carries them to the ranks, which copy that adapter from host memory into its slot
before the step's forward), and the count of swaps. More adapters than slots can be
registered (``max_cpu_loras``, held in host memory by every rank); a waiting request
whose adapter is not resident gets a slot when one is free or holds an adapter no
running request uses, and otherwise waits while requests of resident adapters and of
the base model go ahead. Torch-free; lives as long as the engine.
"""
from __future__ import annotations

from collections import OrderedDict


class AdapterResidency:
    def __init__(self, slots: int):
        self.slots = slots
        self._slot: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._swaps: list[tuple[int, str]] = []
        self.swaps_total = 0

    def resident(self) -> dict[str, int]:
        return dict(self._slot)

    def claim(self, name: str, busy: set[str]) -> bool:
        """Make ``name`` resident for the coming step (marking it most recently used);
        False when every slot holds an adapter of ``busy`` (in use by running requests)."""
        if name in self._slot:
            self._slot.move_to_end(name)
            return True
        free = sorted(set(range(self.slots)) - set(self._slot.values()))
        if free:
            slot = free[0]
        else:
            victim = next((a for a in self._slot if a not in busy), None)
            if victim is None:
                return False
            slot = self._slot.pop(victim)
        self._slot[name] = slot
        self._swaps = [s for s in self._swaps if s[0] != slot] + [(slot, name)]
        self.swaps_total += 1
        return True

    def take_swaps(self) -> tuple[tuple[int, str], ...]:
        """The (slot, adapter) copies the ranks make before the next step; cleared."""
        swaps, self._swaps = tuple(self._swaps), []
        return swaps

    def forget(self, name: str) -> None:
        """``name`` was unloaded: its slot is free (the ranks zeroed it)."""
        slot = self._slot.pop(name, None)
        self._swaps = [s for s in self._swaps if s[1] != name and s[0] != slot]


__all__ = ["AdapterResidency"]
