"""Which fields of two workers' KV handshakes must agree before they exchange blocks,
and how a worker's per-rank KV agents are named.

Owns ``rank_agent_name`` (rank 0's agent carries the worker's own name, which peers
address notifications to; rank i's is ``<worker>.r<i>``), ``SPLIT_FIELDS`` (how a worker splits its KV heads over its ranks: these may
differ between peers, because a transfer maps KV-head ranges from one split onto
the other) and ``handshake_diffs``, the one comparison that the KV transport (when
it loads a peer) and the router (before it pairs two workers) both use. Torch-free.
"""
from __future__ import annotations

from typing import Any, Mapping

SPLIT_FIELDS = frozenset({"tp_size"})


def rank_agent_name(worker: str, rank: int) -> str:
    """The KV agent name of ``worker``'s rank ``rank``."""
    return worker if rank == 0 else f"{worker}.r{rank}"


def handshake_diffs(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, a's value, b's value) for every field that must agree and does not."""
    fields = list(a) + [k for k in b if k not in a]
    return [(k, a.get(k), b.get(k)) for k in fields if k not in SPLIT_FIELDS and a.get(k) != b.get(k)]


__all__ = ["SPLIT_FIELDS", "handshake_diffs", "rank_agent_name"]
