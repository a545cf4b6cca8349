"""The etcd key layout of one pdserve namespace; the only place that spells keys.

Layout (``ns`` is configurable so several clusters can share one etcd):
    /pdserve/<ns>/workers/<role>/<worker_id> -> WorkerRecord JSON   (under the worker's lease)
    /pdserve/<ns>/load/<worker_id>           -> LoadReport JSON     (same lease, ~1 s refresh)
"""
from __future__ import annotations

from dataclasses import dataclass

ROOT = "/pdserve"


@dataclass(frozen=True)
class KeySpace:
    namespace: str = "default"

    def __post_init__(self) -> None:
        if not self.namespace or "/" in self.namespace:
            raise ValueError(f"namespace={self.namespace!r} is invalid: expected a non-empty name without '/'")

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.namespace}/"

    @property
    def workers_prefix(self) -> str:
        return f"{self.prefix}workers/"

    @property
    def load_prefix(self) -> str:
        return f"{self.prefix}load/"

    def worker_key(self, role: str, worker_id: str) -> str:
        return f"{self.workers_prefix}{role}/{worker_id}"

    def load_key(self, worker_id: str) -> str:
        return f"{self.load_prefix}{worker_id}"

    def parse(self, key: str) -> tuple[str, str] | None:
        """Classify a key: ("worker", id) or ("load", id); None for foreign keys."""
        if key.startswith(self.workers_prefix):
            parts = key[len(self.workers_prefix):].split("/")
            return ("worker", parts[1]) if len(parts) == 2 and parts[1] else None
        if key.startswith(self.load_prefix):
            rest = key[len(self.load_prefix):]
            return ("load", rest) if rest and "/" not in rest else None
        return None
