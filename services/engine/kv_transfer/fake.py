"""In-process fake of ``KVTransferAgent``, for unit tests of OTHER components.

Owns: ``FakeKVRegistry`` (the "network": live agents by name, passed explicitly
to every fake agent, never a module global) and ``FakeKVTransferAgent``, which
moves blocks by copying between tensors in one process. It speaks the same
metadata envelope and handshake as the real transport, so compatibility and
restart handling are exercised too. Tests of the transport itself live in
``tests/kv_transfer/test_nixl.py`` against real NIXL.

Lifecycle of a fake transfer:
  ``write_blocks`` -> PENDING -> the next ``poll``/``progress`` copies the blocks,
  delivers the notification into the peer's inbox -> DONE. While ``pause()`` is in
  effect transfers sit in TRANSFERRING (a slow or wedged link); ``fail_next(n)``
  makes the next n writes end FAILED without copying; a peer that closed or
  restarted (new incarnation under the same name) makes writes fail like a
  disconnected NIXL peer.
"""
from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pdserve.engine.kv_transfer.base import (
    KVLayout,
    KVTransferAgent,
    KVTransferError,
    PeerInfo,
    TransferHandle,
    TransferState,
    check_compatible,
)
from pdserve.engine.kv_transfer.descriptors import check_block_ids, checked_layers, merge_block_runs
from pdserve.engine.kv_transfer.heads import HeadCopy, is_whole


class FakeKVRegistry:
    """Live fake agents by name; one per test, shared by the agents it connects."""

    def __init__(self) -> None:
        self._agents: dict[str, FakeKVTransferAgent] = {}

    def join(self, agent: "FakeKVTransferAgent") -> None:
        if agent.name in self._agents:
            raise KVTransferError(f"fake KV agent {agent.name!r} is already live")
        self._agents[agent.name] = agent

    def leave(self, agent: "FakeKVTransferAgent") -> None:
        if self._agents.get(agent.name) is agent:
            del self._agents[agent.name]

    def lookup(self, name: str, incarnation: bytes) -> "FakeKVTransferAgent | None":
        """The live agent ``name`` if it is the incarnation we loaded, else None."""
        agent = self._agents.get(name)
        return agent if agent is not None and agent.incarnation == incarnation else None


@dataclass
class _FakeXfer:
    handle: TransferHandle
    incarnation: bytes
    local_ids: torch.Tensor
    remote_ids: torch.Tensor
    layers: range
    notify: bytes | None
    state: TransferState
    fail: bool
    heads: HeadCopy | None = None


class FakeKVTransferAgent(KVTransferAgent):
    """Copies KV blocks between tensors of agents in the same ``FakeKVRegistry``."""

    def __init__(self, name: str, kv: torch.Tensor, model: str, registry: FakeKVRegistry, tp_size: int = 1,
                 tp_rank: int = 0, total_kv_heads: int = 0, quantization: str | None = None) -> None:
        self._name = name
        self._kv = kv
        self._layout = KVLayout.for_tensor(kv, tp_size, tp_rank, total_kv_heads)
        self._handshake = self._layout.handshake(model, quantization)
        self._registry = registry
        self.incarnation = uuid.uuid4().hex.encode()
        self._peers: dict[str, PeerInfo] = {}
        self._xfers: dict[int, _FakeXfer] = {}
        self._ids = itertools.count(1)
        self._inbox: list[tuple[str, bytes]] = []
        self._paused = False
        self._fail_budget = 0
        self._closed = False
        registry.join(self)

    # ---- test controls -------------------------------------------------------

    def pause(self) -> None:
        """Hold every unfinished transfer in TRANSFERRING until ``resume()``."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def fail_next(self, count: int = 1) -> None:
        """The next ``count`` writes finish FAILED and copy nothing."""
        self._fail_budget += count

    def deliver(self, sender: str, msg: bytes) -> None:
        """Called by a peer: put a message in our inbox."""
        self._inbox.append((sender, msg))

    # ---- KVTransferAgent -----------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def handshake(self) -> dict[str, Any]:
        return dict(self._handshake)

    @property
    def kv(self) -> torch.Tensor:
        return self._kv

    def metadata(self) -> bytes:
        return PeerInfo(self._name, self._handshake, self._layout.num_blocks, self._layout.block_bytes,
                        "FAKE", 0, 0, self.incarnation, self._layout.tp_rank).encode()

    def add_peer(self, peer_name: str, metadata: bytes) -> None:
        self._check_open()
        info = PeerInfo.decode(metadata)
        if info.name != peer_name:
            raise KVTransferError(f"metadata is for KV agent {info.name!r}, not {peer_name!r}")
        check_compatible(self._handshake, info.handshake)
        if self._peers.get(peer_name) == info:
            return
        self.remove_peer(peer_name)  # a restarted peer replaces its stale entry
        self._peers[peer_name] = info

    def remove_peer(self, peer_name: str) -> None:
        if self._peers.pop(peer_name, None) is None:
            return
        for xfer in self._xfers.values():
            if xfer.handle.peer == peer_name and not xfer.state.finished:
                xfer.state = TransferState.FAILED

    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    def peer_layout(self, peer_name: str) -> KVLayout:
        return KVLayout.of_peer(self._peer_info(peer_name))

    def write_blocks(
        self,
        peer_name: str,
        local_block_ids: Sequence[int],
        remote_block_ids: Sequence[int],
        layers: range | None = None,
        notify: bytes | None = None,
        heads: HeadCopy | None = None,
    ) -> TransferHandle:
        self._check_open()
        info = self._peer_info(peer_name)
        self._live_peer(peer_name, info)
        layers = checked_layers(layers, self._layout.num_layers)
        runs = merge_block_runs(local_block_ids, remote_block_ids)
        check_block_ids(runs, self._layout.num_blocks, "local")
        check_block_ids(runs, info.num_blocks, "remote")
        count = len(local_block_ids) * len(layers)
        if heads is not None and is_whole(heads, self._layout, KVLayout.of_peer(info)):
            heads = None
        share = 1.0 if heads is None else heads.count / self._layout.num_kv_heads
        handle = TransferHandle(next(self._ids), peer_name, int(count * self._layout.block_bytes * share),
                                len(runs) * len(layers))
        fail, self._fail_budget = self._fail_budget > 0, max(0, self._fail_budget - 1)
        self._xfers[handle.xfer_id] = _FakeXfer(
            handle, info.transport, torch.as_tensor(list(local_block_ids), dtype=torch.long),
            torch.as_tensor(list(remote_block_ids), dtype=torch.long), layers, notify, TransferState.PENDING, fail,
            heads)
        return handle

    def poll(self, handle: TransferHandle) -> TransferState:
        xfer = self._xfers.get(handle.xfer_id)
        if xfer is None:
            raise KVTransferError(f"KV transfer {handle.xfer_id} is unknown or already released")
        if not xfer.state.finished:
            xfer.state = self._advance(xfer)
        return xfer.state

    def release(self, handle: TransferHandle) -> None:
        self._xfers.pop(handle.xfer_id, None)

    def send_notify(self, peer_name: str, msg: bytes) -> None:
        self._check_open()
        self._live_peer(peer_name, self._peer_info(peer_name)).deliver(self._name, msg)

    def get_notifications(self) -> list[tuple[str, bytes]]:
        self.progress()
        inbox, self._inbox = self._inbox, []
        return inbox

    def progress(self) -> None:
        for xfer in list(self._xfers.values()):
            if not xfer.state.finished:
                xfer.state = self._advance(xfer)

    def close(self) -> None:
        if self._closed:
            return
        for xfer in self._xfers.values():
            if not xfer.state.finished:
                xfer.state = TransferState.FAILED
        self._peers.clear()
        self._registry.leave(self)
        self._closed = True

    # ---- internals -----------------------------------------------------------

    def _advance(self, xfer: _FakeXfer) -> TransferState:
        if self._paused:
            return TransferState.TRANSFERRING
        peer = self._registry.lookup(xfer.handle.peer, xfer.incarnation)
        if xfer.fail or peer is None:
            return TransferState.FAILED
        layers = torch.as_tensor(list(xfer.layers), dtype=torch.long)
        if layers.numel() and xfer.local_ids.numel():
            src = self._kv[layers][:, xfer.local_ids]
            h = xfer.heads
            if h is None:
                peer.kv[layers[:, None], xfer.remote_ids[None, :]] = src.to(peer.kv.device)
            else:
                part = src[..., h.src_first:h.src_first + h.count, :].to(peer.kv.device)
                peer.kv[layers[:, None], xfer.remote_ids[None, :], ..., h.dst_first:h.dst_first + h.count, :] = part
        if xfer.notify is not None:
            peer.deliver(self._name, xfer.notify)
        return TransferState.DONE

    def _peer_info(self, peer_name: str) -> PeerInfo:
        info = self._peers.get(peer_name)
        if info is None:
            raise KVTransferError(f"unknown KV peer {peer_name!r}; known: {sorted(self._peers)}")
        return info

    def _live_peer(self, peer_name: str, info: PeerInfo) -> "FakeKVTransferAgent":
        peer = self._registry.lookup(peer_name, info.transport)
        if peer is None:
            raise KVTransferError(f"KV peer {peer_name!r} is gone (closed or restarted): remove and re-add it")
        return peer

    def _check_open(self) -> None:
        if self._closed:
            raise KVTransferError(f"KV agent {self._name!r} is closed")
