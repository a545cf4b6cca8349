"""The router's handles on live workers: gRPC channels, local in-flight counts,
temporarily excluded ("suspect") workers, ``pick(role, tokens)`` and ``pick_route``.

Lifecycle: channels are opened lazily on first use and closed when discovery
reports the worker gone (or at ``close()``). A worker that fails before streaming
anything is marked suspect for ``suspect_seconds`` (about one lease TTL: a dead
worker's registration lingers until its lease expires) and skipped by ``pick``.
A worker that registers again under its id (a restart on the same address) is a new
peer: its suspect mark and its old channel (which may be in reconnect backoff) go.

Routing one request (``pick_route``): the request goes to a decode worker
(dedicated decode workers when any is live, else hybrid workers) and names the
prefill workers it may use, best first: prefill workers, plus hybrid workers when
the decode worker is a dedicated one; never the decode worker itself, never one
whose KV handshake differs (the pair is refused, logged once, and the reason
travels with the request). No prefill worker is named, and the decode worker
prefills locally, when the prompt is shorter than ``local_prefill_threshold``
tokens or none is usable. Prefill workers never serve whole requests.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import grpc
from pdserve.v1 import worker_pb2_grpc

from pdserve.cluster.discovery import Discovery
from pdserve.cluster.records import WorkerRecord, kv_mismatch
from pdserve.common.roles import prefills_for
from pdserve.router.policies import Candidate, Policy, adapter_affinity, rank_prefill
from pdserve.cluster.tls import TLSFiles, open_channel

log = logging.getLogger(__name__)


@dataclass
class WorkerHandle:
    record: WorkerRecord
    stub: worker_pb2_grpc.WorkerStub


@dataclass(frozen=True)
class RoutingConfig:
    local_prefill_threshold: int = 32
    prefill_candidates: int = 2


@dataclass
class Route:
    """Where one request runs: the decode worker, and the prefill workers it may ask."""

    decode: WorkerHandle
    prefill: list[WorkerRecord] = field(default_factory=list)
    local_reason: str = ""  # why ``prefill`` is empty


class WorkerPool:
    def __init__(self, discovery: Discovery, policies: dict[str, Policy], suspect_seconds: float = 10.0,
                 routing: RoutingConfig = RoutingConfig(), tls: TLSFiles = TLSFiles(), token: str = "") -> None:
        self._discovery = discovery
        self._tls = tls
        self._token = token  # the cluster's token for Worker RPCs (pdserve.cluster.rpc_auth)
        self._policies = policies
        self._suspect_seconds = suspect_seconds
        self._routing = routing
        self._refused_pairs: set[tuple[str, str]] = set()
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}
        self._inflight: dict[str, int] = {}
        self._suspect_until: dict[str, float] = {}
        self._retired: dict[str, list[grpc.aio.Channel]] = {}  # closed once their streams end
        self._known: dict[str, WorkerRecord] = {}
        discovery.add_listener(self._prune)

    def inflight(self, worker_id: str) -> int:
        return self._inflight.get(worker_id, 0)

    def candidates(self, role: str, model: str, exclude: Sequence[str] = (),
                   adapter: str | None = None) -> list[Candidate]:
        """Live, not draining, not excluded, with the LoRA adapter when one is asked for; suspects only
        when nothing else is left."""
        usable = [Candidate(r, self._discovery.load(r.id), self.inflight(r.id))
                  for r in self._discovery.live(role)
                  if r.model == model and r.id not in exclude and not self._discovery.load(r.id).draining
                  and (adapter is None or adapter in r.adapters)]
        now = time.monotonic()
        healthy = [c for c in usable if self._suspect_until.get(c.record.id, 0.0) <= now]
        return healthy or usable

    def pick(self, role: str, tokens: Sequence[int], model: str, exclude: Sequence[str] = (),
             adapter: str | None = None) -> WorkerHandle | None:
        """The policy's choice among live ``role`` workers serving ``model`` (and ``adapter``); None if none."""
        candidates = self.candidates(role, model, exclude, adapter)
        if not candidates:
            return None
        chosen = self._policies[role].choose(adapter_affinity(candidates, adapter), tokens)
        return WorkerHandle(chosen.record, self.stub(chosen.record))

    def pick_route(self, tokens: Sequence[int], model: str, exclude: Sequence[str] = (),
                   adapter: str | None = None) -> Route | None:
        """The decode worker and its prefill workers for one request (see the module docstring); with a
        LoRA adapter only workers that have it loaded."""
        role = "decode" if self.candidates("decode", model, exclude, adapter) else "hybrid"
        handle = self.pick(role, tokens, model, exclude, adapter)
        if handle is None:
            return None
        prefill, reason = self._prefill_for(handle.record, tokens, model, adapter)
        return Route(handle, prefill, reason)

    def _prefill_for(self, decode: WorkerRecord, tokens: Sequence[int], model: str,
                     adapter: str | None) -> tuple[list[WorkerRecord], str]:
        roles = [role for role in ("prefill", "hybrid") if prefills_for(role, decode.role)]
        pool = [c for role in roles for c in self.candidates(role, model, (decode.id,), adapter)]
        if not pool:
            return [], "no_prefill_worker"
        if len(tokens) < self._routing.local_prefill_threshold:
            return [], "short"
        compatible = [c for c in pool if self._compatible(decode, c.record)]
        if not compatible:
            return [], "incompatible"
        ranked = rank_prefill(self._policies["prefill"], compatible, tokens, self._routing.prefill_candidates)
        return [c.record for c in ranked], ""

    def _compatible(self, decode: WorkerRecord, prefill: WorkerRecord) -> bool:
        problem = kv_mismatch(decode, prefill)
        if problem is not None and (decode.id, prefill.id) not in self._refused_pairs:
            self._refused_pairs.add((decode.id, prefill.id))
            log.warning("not pairing decode worker %s with prefill worker %s: %s", decode.id, prefill.id, problem)
        return problem is None

    def stub(self, record: WorkerRecord) -> worker_pb2_grpc.WorkerStub:
        address, channel = self._channels.get(record.id, ("", None))
        if channel is None or address != record.grpc_address:
            channel = open_channel(record.grpc_address, self._tls, options=[
                ("grpc.max_receive_message_length", 64 << 20)], token=self._token)
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
                for channel in self._retired.pop(worker_id, []):
                    asyncio.get_running_loop().create_task(channel.close())

    def _prune(self) -> None:
        """Close channels of departed workers; NOTE: a draining worker is gone from etcd
        while its streams still finish, so a channel with open streams closes after them."""
        records = self._discovery.records
        live = set(records)
        renewed = {w for w, r in records.items() if w in self._known and not _same_worker(self._known[w], r)}
        self._known = dict(records)
        for worker_id in [w for w in self._channels if w not in live or w in renewed]:
            self._retire(worker_id)
        for worker_id in renewed:
            self._suspect_until.pop(worker_id, None)
            log.info("worker %s registered again: fresh channel, not suspect", worker_id)
        for worker_id in [w for w in self._suspect_until if w not in live]:
            del self._suspect_until[worker_id]
        self._refused_pairs = {p for p in self._refused_pairs if p[0] in live and p[1] in live}

    def _retire(self, worker_id: str) -> None:
        _, channel = self._channels.pop(worker_id)
        if self.inflight(worker_id):
            self._retired.setdefault(worker_id, []).append(channel)
        else:
            asyncio.get_running_loop().create_task(channel.close())

    async def close(self) -> None:
        channels = [c for _, c in self._channels.values()] + [c for cs in self._retired.values() for c in cs]
        self._channels.clear()
        self._retired.clear()
        for channel in channels:
            await channel.close()


def _same_worker(old: WorkerRecord, new: WorkerRecord) -> bool:
    """The same registration, updated in place (its adapters changed), not a restart."""
    return replace(old, adapters=[]) == replace(new, adapters=[])
