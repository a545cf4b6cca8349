"""KV transfer: move KV-cache blocks between workers (prefill -> decode).

Owns nothing itself; it re-exports the interface. ``base`` defines the contract
(``KVTransferAgent``, ``KVLayout``, states, errors, ``wait``), ``descriptors``
the block-id -> byte-region arithmetic, ``nixl_connector`` the NIXL
implementation and ``fake`` an in-process fake for unit tests of other
components. ``nixl_connector`` is imported lazily so that users of the fake do
not load NIXL. See README.md for the lifecycle and the layering rules.
"""
from __future__ import annotations

from typing import Any

from pdserve.engine.kv_transfer.base import (
    PROTOCOL_VERSION,
    KVCompatibilityError,
    KVLayout,
    KVTransferAgent,
    KVTransferError,
    KVTransferTimeout,
    PeerInfo,
    TransferHandle,
    TransferState,
    check_compatible,
    wait,
)
from pdserve.engine.kv_transfer.descriptors import BlockRun, KVRegion, merge_block_runs

__all__ = [
    "PROTOCOL_VERSION", "BlockRun", "KVCompatibilityError", "KVLayout", "KVRegion", "KVTransferAgent",
    "KVTransferError", "KVTransferTimeout", "NixlConfig", "NixlKVTransferAgent", "PeerInfo",
    "TransferHandle", "TransferState", "check_compatible", "merge_block_runs", "wait",
]


def __getattr__(name: str) -> Any:
    if name in ("NixlKVTransferAgent", "NixlConfig"):
        from pdserve.engine.kv_transfer import nixl_connector

        return getattr(nixl_connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
