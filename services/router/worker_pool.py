"""The router's handles on live workers: gRPC channels, local in-flight counts,
temporarily excluded ("suspect") workers, and ``pick(role, tokens)``.

Lifecycle: channels are opened lazily on first use and closed when discovery
reports the worker gone (or at ``close()``). A worker that fails before streaming
anything is marked suspect for ``suspect_seconds`` (about one lease TTL: a dead
worker's registration lingers until its lease expires) and skipped by ``pick``.

NOTE: until the disaggregated path lands, every role serves whole requests: the
router asks for ``hybrid`` and falls back to ``decode`` then ``prefill`` workers.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import grpc
from pdserve.v1 import worker_pb2_grpc

from services.cluster.discovery import Discovery
from services.cluster.records import WorkerRecord
from services.router.policies import Candidate, Policy

SERVING_ROLES = ("hybrid", "decode", "prefill")


@dataclass
class WorkerHandle:
    record: WorkerRecord
    stub: worker_pb2_grpc.WorkerStub


class WorkerPool:
    def __init__(self, discovery: Discovery, policies: dict[str, Policy], suspect_seconds: float = 10.0) -> None:
        self._discovery = discovery
        self._policies = policies
        self._suspect_seconds = suspect_seconds
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}
        self._inflight: dict[str, int] = {}
        self._suspect_until: dict[str, float] = {}
        self._retired: dict[str, grpc.aio.Channel] = {}
        discovery.add_listener(self._prune)

    def inflight(self, worker_id: str) -> int:
        return self._inflight.get(worker_id, 0)

    def candidates(self, role: str, model: str, exclude: Sequence[str] = ()) -> list[Candidate]:
        """Live, not draining, not excluded; suspects only when nothing else is left."""
        usable = [Candidate(r, self._discovery.load(r.id), self.inflight(r.id))
                  for r in self._discovery.live(role)
                  if r.model == model and r.id not in exclude and not self._discovery.load(r.id).draining]
        now = time.monotonic()
        healthy = [c for c in usable if self._suspect_until.get(c.record.id, 0.0) <= now]
        return healthy or usable

    def pick(self, role: str, tokens: Sequence[int], model: str, exclude: Sequence[str] = ()) -> WorkerHandle | None:
        """The policy's choice among live ``role`` workers serving ``model``; None if there is none."""
        candidates = self.candidates(role, model, exclude)
        if not candidates:
            return None
        chosen = self._policies[role].choose(candidates, tokens)
        return WorkerHandle(chosen.record, self.stub(chosen.record))

    def pick_serving(self, tokens: Sequence[int], model: str, exclude: Sequence[str] = ()) -> WorkerHandle | None:
        """A worker that runs the whole request (see the module NOTE on roles)."""
        for role in SERVING_ROLES:
            handle = self.pick(role, tokens, model, exclude)
            if handle is not None:
                return handle
        return None

    def stub(self, record: WorkerRecord) -> worker_pb2_grpc.WorkerStub:
        address, channel = self._channels.get(record.id, ("", None))
        if channel is None or address != record.grpc_address:
            channel = grpc.aio.insecure_channel(record.grpc_address, options=[
                ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.max_receive_message_length", 64 << 20)])
            self._channels[record.id] = (record.grpc_address, channel)
        return worker_pb2_grpc.WorkerStub(channel)

    def mark_suspect(self, worker_id: str) -> None:
        self._suspect_until[worker_id] = time.monotonic() + self._suspect_seconds

    @contextlib.contextmanager
    def track(self, worker_id: str) -> Iterator[None]:
        """Count one open stream on ``worker_id`` while the block runs."""
        self._inflight[worker_id] = self.inflight(worker_id) + 1
        try:
            yield
        finally:
            self._inflight[worker_id] -= 1
            if self._inflight[worker_id] == 0:
                del self._inflight[worker_id]
                if worker_id in self._retired:
                    asyncio.get_running_loop().create_task(self._retired.pop(worker_id).close())

    def _prune(self) -> None:
        """Close channels of departed workers; NOTE: a draining worker is gone from etcd
        while its streams still finish, so a channel with open streams closes after them."""
        live = set(self._discovery.records)
        for worker_id in [w for w in self._channels if w not in live]:
            _, channel = self._channels.pop(worker_id)
            if self.inflight(worker_id):
                self._retired[worker_id] = channel
            else:
                asyncio.get_running_loop().create_task(channel.close())
        for worker_id in [w for w in self._suspect_until if w not in live]:
            del self._suspect_until[worker_id]

    async def close(self) -> None:
        channels = [c for _, c in self._channels.values()] + list(self._retired.values())
        self._channels.clear()
        self._retired.clear()
        for channel in channels:
            await channel.close()
