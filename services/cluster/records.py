"""The JSON documents a worker publishes in etcd and the router reads back.

Owns ``WorkerRecord`` (static facts about one worker, written once per lease) and
``LoadReport`` (its load, refreshed about once a second). Both parse leniently:
unknown keys from newer workers are ignored, so routers and workers can be
upgraded one at a time.

A worker that can exchange KV blocks also publishes, in its record and so under
its lease, its KV transfer identity: ``kv_agent`` (the NIXL agent name peers
address), ``kv_handshake`` (what two peers must agree on: model, dtype, block
size, KV layout, protocol version) and ``kv_metadata`` (the agent's connection
blob, base64; a tensor-parallel worker adds ``kv_ranks``, one blob per further
rank, whose agents are named by ``pdserve.common.kv_compat.rank_agent_name``).
Workers of different tp pair: the transfer maps KV-head ranges. A restarted
worker publishes new metadata; a dead one's record (and so its metadata)
vanishes with its lease. ``kv_mismatch`` is the one
torch-free comparison of two records' handshakes (the router uses it to refuse
pairing incompatible workers). Which roles pair at all is ``pdserve.common.roles``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

from pdserve.common.kv_compat import handshake_diffs

PROTOCOL_VERSION = "pdserve.v1"


@dataclass(frozen=True)
class WorkerRecord:
    id: str
    role: str
    grpc_address: str
    metrics_url: str
    model: str
    dtype: str = "float32"
    block_size: int = 16
    max_model_len: int = 2048
    tp: int = 1
    kv_layout: dict[str, Any] = field(default_factory=dict)
    capacity: dict[str, Any] = field(default_factory=dict)
    version: str = PROTOCOL_VERSION
    kv_agent: str = ""
    kv_handshake: dict[str, Any] = field(default_factory=dict)
    kv_metadata: str = ""  # base64 of the agent's metadata bytes (rank 0's for a tensor-parallel worker)
    kv_ranks: list[str] = field(default_factory=list)  # base64 metadata of ranks 1.. (tp > 1)
    adapters: list[str] = field(default_factory=list)  # LoRA adapters the worker can generate with
    quantization: str | None = None  # the weights' scheme ("w8a8-int8"); None: unquantized

    @property
    def can_transfer_kv(self) -> bool:
        return bool(self.kv_agent and self.kv_metadata and self.kv_handshake)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> "WorkerRecord":
        """Parse a record; raises ValueError when required fields are missing."""
        return _from_dict(cls, json.loads(raw))


@dataclass(frozen=True)
class LoadReport:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    kv_blocks_cached: int = 0
    kv_blocks_total: int = 0
    tokens_computed_total: int = 0
    draining: bool = False
    lora_resident: list[str] = field(default_factory=list)  # LoRA adapters in its device slots now
    timestamp: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> "LoadReport":
        return _from_dict(cls, json.loads(raw))

    def public(self) -> dict[str, int]:
        """The load fields shown by the router's ``GET /workers``."""
        return {
            "running": self.running,
            "waiting": self.waiting,
            "kv_blocks_used": self.kv_blocks_used,
            "kv_blocks_free": self.kv_blocks_free,
            "kv_blocks_cached": self.kv_blocks_cached,
        }


def kv_mismatch(a: WorkerRecord, b: WorkerRecord) -> str | None:
    """Why ``a`` and ``b`` cannot exchange KV blocks, or None when they can.

    Example: ``decode-1 and prefill-2 cannot exchange KV: block_size: 32 != 16``.
    """
    if not a.can_transfer_kv or not b.can_transfer_kv:
        missing = [r.id for r in (a, b) if not r.can_transfer_kv]
        return f"{a.id} and {b.id} cannot exchange KV: {missing} publish no KV transfer agent"
    diffs = [f"{k}: {x!r} != {y!r}" for k, x, y in handshake_diffs(a.kv_handshake, b.kv_handshake)]
    if not diffs:
        return None
    return f"{a.id} and {b.id} cannot exchange KV: " + "; ".join(diffs)


def _from_dict(cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise ValueError(f"{cls.__name__}: {exc}") from None
