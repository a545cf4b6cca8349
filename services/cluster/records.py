"""The JSON documents a worker publishes in etcd and the router reads back.

Owns ``WorkerRecord`` (static facts about one worker, written once per lease) and
``LoadReport`` (its load, refreshed about once a second). Both parse leniently:
unknown keys from newer workers are ignored, so routers and workers can be
upgraded one at a time.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

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


def _from_dict(cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise ValueError(f"{cls.__name__}: {exc}") from None
