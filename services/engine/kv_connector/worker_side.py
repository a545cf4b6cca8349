"""The KV connector's worker side, compute half: sending a layer's KV as soon as it is written.

Owns the ``LayerSender`` interface a rank calls at one fixed point of each step:
before running its plan, ``begin_step(rows, tables, orders)`` says which rows it
runs, with which block tables and (tensor-parallel prefill) which rows' KV the
ranks send where; the sender returns a hook (or None), which the rank's
model calls with ``(layer, event)`` as each layer's work is queued. That layer's
KV may be read once ``event.query()`` is True (at once on CPU; on a GPU when the
device got there). A step with a hook runs eagerly (no graph replay).

The prefill role's server implements it for a one-rank engine (it posts each
layer's writes from the worker's event loop); ``rank_side.RankKVEndpoint`` does
in each rank process of a tensor-parallel engine. The transport half is
``transfers.KVTransfers``.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from pdserve.engine.plan import KVSendOrder, PlannedRow

LayerHook = Callable[[int, Any], None]  # (layer, event done once that layer's KV is in the cache)


class LayerSender(Protocol):
    def begin_step(self, rows: tuple[PlannedRow, ...], tables: list[list[int]],
                   orders: list[KVSendOrder | None]) -> LayerHook | None:
        """Called by a rank before a step; returns the per-layer hook or None."""


__all__ = ["LayerHook", "LayerSender"]
