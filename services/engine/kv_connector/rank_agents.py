"""The worker process's handle on the KV agents of its ranks (a tensor-parallel worker).

Owns: the KV pipe to each rank process (command out, events back), the metadata
each rank's agent published, the peers loaded into every rank, the inbox of
notifications rank 0's agent received, and the send jobs the worker tracks
(request id -> the ranks that have not reported its end yet).

Lifecycle: ``RankAgents(links, worker, model)`` asks every rank to register its
KV shard with an agent (``rank_side.RankKVEndpoint``) and waits for their
metadata -> it stands in for one agent: ``KVPeers`` adds and removes peers
(forwarded to every rank), ``KVTransfers`` drains events through
``get_notifications`` / ``progress`` -> per remote prefill the prefill server
``track``s the job, the ranks send the KV as they compute it (the order travels
in the step plan), each reports the job's end, ``cancel`` stops a job ->
``close()`` closes the ranks' agents.

NOTE: writes are posted by the ranks, never from here: ``write_blocks``, ``poll``
and ``release`` refuse. Single-threaded: every call on the worker's event loop.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Sequence

from pdserve.engine.kv_transfer import (KVLayout, KVTransferAgent, KVTransferError, PeerInfo, TransferHandle,
                                        TransferState, check_compatible)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankSend:
    """One rank's report on a job: every write of it is over."""
    status: str  # DONE | FAILED | ABORTED
    error: str
    nbytes: int


@dataclass
class _Tracked:
    future: asyncio.Future[list[RankSend]]
    reports: dict[int, RankSend] = field(default_factory=dict)


class RankAgents(KVTransferAgent):
    def __init__(self, links: Sequence[Connection], worker: str, model: str, timeout: float = 60.0) -> None:
        self._links = list(links)
        self._name = worker
        for link in self._links:
            link.send(("open", worker, model))
        self._metadata = [_opened(rank, link, timeout) for rank, link in enumerate(self._links)]
        info = PeerInfo.decode(self._metadata[0])
        self._handshake = dict(info.handshake)
        self._layout = KVLayout.of_peer(info)
        self._peers: dict[str, bytes] = {}
        self._inbox: list[tuple[str, bytes]] = []
        self._jobs: dict[str, _Tracked] = {}
        self._closed = False

    # ---- identity and peers -----------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def handshake(self) -> dict[str, Any]:
        return dict(self._handshake)

    def metadata(self) -> bytes:
        return self._metadata[0]

    def rank_metadata(self) -> list[bytes]:
        return self._metadata[1:]

    def add_peer(self, peer_name: str, metadata: bytes) -> None:
        info = PeerInfo.decode(metadata)
        if info.name != peer_name:
            raise KVTransferError(f"metadata is for KV agent {info.name!r}, not {peer_name!r}")
        check_compatible(self._handshake, info.handshake)
        if self._peers.get(peer_name) == metadata:
            return
        self._peers[peer_name] = bytes(metadata)
        self._command("add_peer", peer_name, bytes(metadata))

    def remove_peer(self, peer_name: str) -> None:
        # NOTE: a rank that has exited holds no peers: nothing to remove there. (At a cluster's
        # stop the ranks may exit before discovery reports the other workers gone; a dead rank
        # under load is the executor's to report.)
        if self._peers.pop(peer_name, None) is not None:
            self._command("remove_peer", peer_name, quiet=True)

    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    def peer_layout(self, peer_name: str) -> KVLayout:
        if peer_name not in self._peers:
            raise KVTransferError(f"unknown KV peer {peer_name!r}; known: {sorted(self._peers)}")
        return KVLayout.of_peer(PeerInfo.decode(self._peers[peer_name]))

    # ---- sends: posted by the ranks -----------------------------------------------------
    def write_blocks(self, peer_name: str, local_block_ids: Sequence[int], remote_block_ids: Sequence[int],
                     layers: range | None = None, notify: bytes | None = None, heads: Any = None) -> TransferHandle:
        raise KVTransferError("the ranks of a tensor-parallel worker post their own KV writes")

    def poll(self, handle: TransferHandle) -> TransferState:
        raise KVTransferError("the ranks of a tensor-parallel worker post their own KV writes")

    def release(self, handle: TransferHandle) -> None:
        raise KVTransferError("the ranks of a tensor-parallel worker post their own KV writes")

    def track(self, request_id: str) -> asyncio.Future[list[RankSend]]:
        """A future of every rank's report on ``request_id``'s send, in rank order."""
        fut = asyncio.get_running_loop().create_future()
        self._jobs[request_id] = _Tracked(fut)
        return fut

    def cancel(self, request_id: str) -> None:
        """Stop posting ``request_id``'s writes; each rank reports once none is in flight."""
        self._command("cancel", request_id)

    def untrack(self, request_id: str) -> None:
        tracked = self._jobs.pop(request_id, None)
        if tracked is not None and not tracked.future.done():
            tracked.future.cancel()

    # ---- notifications and events -----------------------------------------------------
    def send_notify(self, peer_name: str, msg: bytes) -> None:
        """Sent by rank 0's agent, whose name is the worker's."""
        self._send(0, ("notify", peer_name, msg))

    def get_notifications(self) -> list[tuple[str, bytes]]:
        self.progress()
        inbox, self._inbox = self._inbox, []
        return inbox

    def progress(self) -> None:
        for rank, link in enumerate(self._links):
            try:
                while link.poll():
                    self._on_event(rank, link.recv())
            except (EOFError, OSError):
                self._fail_all(f"rank {rank} is gone")

    def _on_event(self, rank: int, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "notif":
            self._inbox.append((event[1], event[2]))
        elif kind == "job":
            self._report(event[1], rank, RankSend(*event[2:]))
        elif kind == "peer_error":
            log.error("rank %d refused KV peer %s: %s", rank, event[1], event[2])
        else:
            log.error("unknown KV event %r from rank %d", kind, rank)

    def _report(self, request_id: str, rank: int, report: RankSend) -> None:
        tracked = self._jobs.get(request_id)
        if tracked is None or tracked.future.done() or rank in tracked.reports:
            return  # NOTE: e.g. the answer to a cancel of a job that had already ended
        tracked.reports[rank] = report
        if len(tracked.reports) == len(self._links):
            tracked.future.set_result([tracked.reports[r] for r in range(len(self._links))])

    def _fail_all(self, why: str) -> None:
        for tracked in self._jobs.values():
            if not tracked.future.done():
                tracked.future.set_exception(KVTransferError(why))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fail_all("the worker's KV agents closed")
        for rank in range(len(self._links)):
            self._send(rank, ("close",), quiet=True)

    # ---- pipes ----------------------------------------------------------------------------
    def _command(self, *command: Any, quiet: bool = False) -> None:
        for rank in range(len(self._links)):
            self._send(rank, command, quiet)

    def _send(self, rank: int, command: tuple[Any, ...], quiet: bool = False) -> None:
        try:
            self._links[rank].send(command)
        except OSError as exc:
            if not quiet:
                raise KVTransferError(f"rank {rank} is gone: {exc}") from exc


def _opened(rank: int, link: Connection, timeout: float) -> bytes:
    """Wait for a rank's answer to ``open``: its agent's metadata."""
    if not link.poll(timeout):
        raise KVTransferError(f"rank {rank} did not open its KV agent within {timeout:.0f} s")
    kind, value = link.recv()
    if kind != "opened":
        raise KVTransferError(f"rank {rank} could not open its KV agent: {value}")
    return value


__all__ = ["RankAgents", "RankSend"]
