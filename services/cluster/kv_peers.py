"""A worker's KV transfer peers, kept in sync with etcd, and its progress loop.

Owns: the peers loaded into the worker's KV transfer agent (kept equal to the
live, pairable workers that discovery shows), the errors of refused peers (the
compatibility handshake), the progress task, and the waiters for completion
notifications (by request id). The agent itself (``KVTransferAgent`` over the
engine's KV tensor) is built by the worker and handed in; this module never
imports torch or the engine, it only calls the agent's interface.

Lifecycle:
  ``KVPeers(agent, ...)`` -> its ``identity()`` goes into the worker record
  (etcd, under the lease) -> ``start(discovery)`` loads every live peer and
  follows the watch (a new worker is added, a gone one removed, a restarted one
  replaced by its new metadata) and starts the progress task -> ``close()``
  stops the task and closes the agent (fails what is in flight).

Progress: no thread. One asyncio task calls ``get_notifications()`` (which
progresses every transfer) every ``busy_poll`` seconds while anything is in
flight (a waiter, an active sender, and ``busy_linger`` seconds after a sender
is done, so its last notification leaves at once) and every ``idle_poll``
seconds otherwise, so an idle worker costs ~0 CPU.

NOTE: every NIXL call happens on the event loop thread that owns this object.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator

from pdserve.cluster.discovery import Discovery
from pdserve.cluster.records import WorkerRecord

log = logging.getLogger(__name__)
NOTIFY_VERSION = 1


class PeerUnavailable(Exception):
    """A KV peer is not loaded (not in discovery yet, gone, or refused)."""


class PeerIncompatible(PeerUnavailable):
    """Discovery shows the peer but the compatibility handshake failed; the message
    names every differing field with both values."""


@dataclass(frozen=True)
class KVPeersConfig:
    busy_poll: float = 0.001
    idle_poll: float = 0.1
    busy_linger: float = 0.05

    def __post_init__(self) -> None:
        if not 0 < self.busy_poll <= self.idle_poll:
            raise ValueError(f"KVPeersConfig: need 0 < busy_poll ({self.busy_poll}) <= idle_poll ({self.idle_poll})")
        if self.busy_linger < 0:
            raise ValueError(f"KVPeersConfig: busy_linger ({self.busy_linger}) must be >= 0")


def encode_done(request_id: str, first_token: int) -> bytes:
    """The completion notification: every block of ``request_id`` has landed."""
    return json.dumps({"v": NOTIFY_VERSION, "rid": request_id, "first": first_token}).encode()


def decode_done(msg: bytes) -> tuple[str, int] | None:
    try:
        body = json.loads(msg)
        return str(body["rid"]), int(body["first"])
    except (ValueError, KeyError, TypeError):
        return None


def incarnation(kv_metadata_b64: str) -> str:
    """A short digest naming one incarnation of a worker's published KV metadata."""
    return hashlib.sha256(kv_metadata_b64.encode()).hexdigest()[:16]


def pairs_with(role: str, other_role: str) -> bool:
    """Prefill writes into decode; hybrid is either side; same-role pools never pair."""
    return not (role == other_role and role in ("prefill", "decode"))


class KVPeers:
    def __init__(self, agent: Any, model: str, worker_id: str, role: str,
                 config: KVPeersConfig = KVPeersConfig()) -> None:
        self.agent = agent
        self.handshake: dict[str, Any] = agent.layout.handshake(model)
        self._worker_id = worker_id
        self._role = role
        self._config = config
        self._loaded: dict[str, str] = {}  # agent name -> base64 metadata loaded
        self.errors: dict[str, str] = {}  # worker id -> why it is not a peer
        self._waiters: dict[str, tuple[asyncio.Future[int], str]] = {}  # request id -> (future, sender)
        self._busy = 0
        self._linger_until = 0.0  # loop time until which a finished sender still polls fast
        self._wake = asyncio.Event()
        self._discovery: Discovery | None = None
        self._task: asyncio.Task | None = None
        self.metadata_b64 = base64.b64encode(agent.metadata()).decode()

    @property
    def name(self) -> str:
        return self.agent.name

    def identity(self) -> dict[str, Any]:
        """The fields this worker publishes in its record."""
        return {"kv_agent": self.name, "kv_handshake": self.handshake, "kv_metadata": self.metadata_b64}

    @property
    def incarnation(self) -> str:
        return incarnation(self.metadata_b64)

    # ---- lifecycle -------------------------------------------------------------
    async def start(self, discovery: Discovery) -> None:
        self._discovery = discovery
        discovery.add_listener(self.sync)
        self.sync()
        self._task = asyncio.create_task(self._run(), name="kv-peers-progress")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for fut, _ in self._waiters.values():
            if not fut.done():
                fut.set_exception(PeerUnavailable("the worker's KV transfer agent closed"))
        self.agent.close()

    # ---- peers -----------------------------------------------------------------
    def sync(self) -> None:
        """Make the loaded peers equal the live, pairable workers (discovery listener)."""
        records = self._discovery.records if self._discovery is not None else {}
        wanted = {r.kv_agent: r for r in records.values()
                  if r.id != self._worker_id and r.can_transfer_kv and pairs_with(self._role, r.role)}
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
            self.agent.add_peer(name, base64.b64decode(record.kv_metadata))
        except Exception as exc:  # KVCompatibilityError names the fields; others the cause
            if self.errors.get(record.id) is None:
                log.warning("refusing KV peer %s (%s): %s", record.id, record.role, exc)
            self.errors[record.id] = f"worker {record.id}: {exc}"
            return
        self._loaded[name] = record.kv_metadata
        self.errors.pop(record.id, None)
        log.info("KV peer %s (%s) added", name, record.role)

    def _drop(self, name: str) -> None:
        self._loaded.pop(name, None)
        self.agent.remove_peer(name)  # fails its in-flight writes, forgets its metadata
        log.info("KV peer %s removed", name)

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

    # ---- notifications ---------------------------------------------------------
    def expect(self, request_id: str, sender: str) -> asyncio.Future[int]:
        """A future resolved with the first token when ``sender`` (a KV agent name) says
        ``request_id``'s KV has landed; a notification from any other agent is refused."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = (fut, sender)
        self._wake.set()
        return fut

    def forget(self, request_id: str) -> None:
        fut, _ = self._waiters.pop(request_id, (None, ""))
        if fut is not None and not fut.done():
            fut.cancel()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Poll fast while the block runs (a sender with writes in flight)."""
        self._busy += 1
        self._wake.set()
        try:
            yield
        finally:
            self._busy -= 1
            self._linger_until = asyncio.get_running_loop().time() + self._config.busy_linger

    async def _run(self) -> None:
        while True:
            try:
                for sender, msg in self.agent.get_notifications():
                    self._deliver(sender, msg)
            except Exception:  # NOTE: the progress task must outlive any one bad tick
                log.exception("KV progress tick failed")
            if self._waiters or self._busy or asyncio.get_running_loop().time() < self._linger_until:
                await asyncio.sleep(self._config.busy_poll)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._config.idle_poll)

    def _deliver(self, sender: str, msg: bytes) -> None:
        parsed = decode_done(msg)
        if parsed is None:
            log.warning("ignoring a malformed KV notification from %s: %r", sender, msg[:80])
            return
        request_id, first = parsed
        fut, expected = self._waiters.get(request_id, (None, ""))
        if fut is None or fut.done():
            log.info("KV notification for %s from %s arrived after the request moved on", request_id, sender)
            return
        if sender != expected:
            log.warning("refusing a KV notification for %s from %s: this worker ordered it from %s",
                        request_id, sender, expected)
            return
        del self._waiters[request_id]
        fut.set_result(first)
