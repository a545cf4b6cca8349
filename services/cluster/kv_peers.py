"""A worker's KV transfer peers, kept in sync with etcd.

Owns: the peers loaded into the worker's KV transfer agent (kept equal to the
live workers of a pairing role that discovery shows; a tensor-parallel peer is
one agent per rank), the errors of refused
peers (the compatibility handshake) and the worker's KV identity (agent name,
handshake, metadata) as published in its record. The agent itself
(``KVTransferAgent`` over the engine's KV-cache shard) is built by the worker
and handed in; its progress loop and completion notifications are the KV
connector's (``pdserve.engine.kv_connector.transfers``). This module never
imports torch or the engine, it only calls the agent's interface.

Lifecycle:
  ``KVPeers(agent, ...)`` -> its ``identity()`` goes into the worker record
  (etcd, under the lease) -> ``start(discovery)`` loads every live peer and
  follows the watch (a new worker is added, a gone one removed, a restarted one
  replaced by its new metadata) for the rest of the worker's life.

NOTE: every agent call happens on the event loop thread that owns this object.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from typing import Any

from pdserve.cluster.discovery import Discovery
from pdserve.cluster.records import WorkerRecord
from pdserve.common.roles import kv_pair
from pdserve.common.kv_compat import rank_agent_name

log = logging.getLogger(__name__)


class PeerUnavailable(Exception):
    """A KV peer is not loaded (not in discovery yet, gone, or refused)."""


class PeerIncompatible(PeerUnavailable):
    """Discovery shows the peer but the compatibility handshake failed; the message
    names every differing field with both values."""


def incarnation(kv_metadata_b64: str) -> str:
    """A short digest naming one incarnation of a worker's published KV metadata."""
    return hashlib.sha256(kv_metadata_b64.encode()).hexdigest()[:16]


class KVPeers:
    def __init__(self, agent: Any, worker_id: str, role: str) -> None:
        self.agent = agent
        self.handshake: dict[str, Any] = agent.handshake
        self._worker_id = worker_id
        self._role = role
        self._loaded: dict[str, str] = {}  # agent name -> base64 metadata loaded
        self._ranks: dict[str, int] = {}  # agent name -> how many rank agents it has
        self.errors: dict[str, str] = {}  # worker id -> why it is not a peer
        self._discovery: Discovery | None = None
        self.metadata_b64 = base64.b64encode(agent.metadata()).decode()
        self._rank_metadata = [base64.b64encode(m).decode() for m in agent.rank_metadata()]

    @property
    def name(self) -> str:
        return self.agent.name

    def identity(self) -> dict[str, Any]:
        """The fields this worker publishes in its record."""
        return {"kv_agent": self.name, "kv_handshake": self.handshake, "kv_metadata": self.metadata_b64,
                "kv_ranks": self._rank_metadata}

    @property
    def incarnation(self) -> str:
        return incarnation(self.metadata_b64)

    # ---- lifecycle -------------------------------------------------------------
    def start(self, discovery: Discovery) -> None:
        self._discovery = discovery
        discovery.add_listener(self.sync)
        self.sync()

    def peer_count(self) -> int:
        return len(self._loaded)

    # ---- peers -----------------------------------------------------------------
    def sync(self) -> None:
        """Make the loaded peers equal the live, pairable workers (discovery listener)."""
        records = self._discovery.records if self._discovery is not None else {}
        wanted = {r.kv_agent: r for r in records.values()
                  if r.id != self._worker_id and r.can_transfer_kv and kv_pair(self._role, r.role)}
        for name in [n for n in self._loaded if n not in wanted]:
            self._drop(name)
        live_ids = {r.id for r in wanted.values()}
        self.errors = {k: v for k, v in self.errors.items() if k in live_ids}
        for name, record in wanted.items():
            if self._loaded.get(name) != record.kv_metadata:
                self._load(name, record)

    def _load(self, name: str, record: WorkerRecord) -> None:
        if name in self._loaded:
            log.info("KV peer %s re-registered (restart?): replacing its metadata", name)
            self._drop(name)
        try:
            for rank, metadata in enumerate([record.kv_metadata, *record.kv_ranks]):
                self.agent.add_peer(rank_agent_name(name, rank), base64.b64decode(metadata))
        except Exception as exc:  # KVCompatibilityError names the fields; others the cause
            if self.errors.get(record.id) is None:
                log.warning("refusing KV peer %s (%s): %s", record.id, record.role, exc)
            self.errors[record.id] = f"worker {record.id}: {exc}"
            self._forget_ranks(name, 1 + len(record.kv_ranks))
            return
        self._loaded[name] = record.kv_metadata
        self._ranks[name] = 1 + len(record.kv_ranks)
        self.errors.pop(record.id, None)
        log.info("KV peer %s (%s) added", name, record.role)

    def _drop(self, name: str) -> None:
        self._loaded.pop(name, None)
        self._forget_ranks(name, self._ranks.pop(name, 1))
        log.info("KV peer %s removed", name)

    def _forget_ranks(self, name: str, ranks: int) -> None:
        for rank in range(ranks):
            self.agent.remove_peer(rank_agent_name(name, rank))  # fails its in-flight writes, forgets its metadata

    def reload(self, name: str) -> None:
        """Drop a peer (failing its in-flight writes) and load it again from discovery."""
        if name in self._loaded:
            self._drop(name)
        self.sync()

    def peer_error(self, worker_id: str) -> str | None:
        return self.errors.get(worker_id)

    async def wait_peer(self, name: str, timeout: float, want: str = "") -> None:
        """Wait until ``name`` is a loaded peer, in incarnation ``want`` when given
        (discovery may lag the request a little, e.g. right after a restart).

        NOTE: agent names are worker ids, so ``errors`` (by worker id) covers them.

        Raises:
            PeerIncompatible: discovery showed it and the handshake failed.
            PeerUnavailable: it did not appear within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while name not in self._loaded or (want and incarnation(self._loaded[name]) != want):
            error = self.errors.get(name)
            if error is not None:
                raise PeerIncompatible(error)
            if loop.time() >= deadline:
                raise PeerUnavailable(f"KV peer {name!r} (incarnation {want or 'any'}) is not known here "
                                      f"(not in discovery after {timeout:.1f} s)")
            await asyncio.sleep(0.01)

    def is_gone(self, worker_id: str, kv_metadata: str) -> bool:
        """True once ``worker_id``'s lease is gone or it re-registered (restarted):
        the incarnation with ``kv_metadata`` can write nothing any more."""
        records = self._discovery.records if self._discovery is not None else {}
        record = records.get(worker_id)
        return record is None or record.kv_metadata != kv_metadata

    def record_of(self, worker_id: str) -> WorkerRecord | None:
        return self._discovery.records.get(worker_id) if self._discovery is not None else None
