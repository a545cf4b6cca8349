"""NIXL implementation of ``KVTransferAgent``: UCX, DRAM on CPU, VRAM on CUDA.

Owns: one ``nixl_agent`` per worker; the single registration of the worker's KV
tensor; the prepared descriptor lists (ours, built once, and one per loaded
peer); the NIXL handles of in-flight writes; the inbox of received notifications.

Lifecycle:
  ``__init__`` creates the agent (no progress thread), registers the whole KV
  tensor once and, in prepared mode, prepares one local descriptor per
  (layer, block). ``add_peer`` checks the handshake, loads the peer's NIXL
  metadata and prepares its per-(layer, block) list. ``write_blocks`` merges the
  block ids into runs (``descriptors.py``) and posts one NIXL WRITE (for a
  peer of another tp, some heads of each token row: one descriptor per row). ``progress``
  polls every unfinished write and drains notifications. ``remove_peer`` fails
  that peer's writes, releases their handles and its list, then invalidates its
  metadata (so a restarted peer can be added again under the same name).
  ``close`` does the same for everything and deregisters the tensor.

Two ways to build a transfer, chosen per peer by ``NixlConfig.prepped``:
  * prepared (default when the (layer, block) table is small enough): one
    ``make_prepped_xfer`` from index arrays; NIXL merges adjacent entries back into
    one descriptor per run, and creation is ~3x cheaper than building lists.
  * direct: ``initialize_xfer`` with our merged (addr, len) runs, for caches too
    large to prepare per (layer, block).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from nixl._api import nixl_agent, nixl_agent_config, nixl_prepped_dlist_handle, nixl_xfer_handle

from pdserve.engine.kv_transfer.base import (
    KVCompatibilityError,
    KVLayout,
    KVTransferAgent,
    KVTransferError,
    PeerInfo,
    TransferHandle,
    TransferState,
    check_compatible,
)
from pdserve.engine.kv_transfer.heads import HeadCopy, is_whole
from pdserve.engine.kv_transfer.descriptors import (
    BlockRun,
    KVRegion,
    all_block_descriptors,
    check_block_ids,
    checked_layers,
    head_descriptors,
    merge_block_runs,
    run_descriptors,
    run_indices,
)

logger = logging.getLogger(__name__)

_LOCAL = "NIXL_INIT_AGENT"


@dataclass(frozen=True)
class NixlConfig:
    """Transport knobs, built once from the engine config.

    Attributes:
        backend: NIXL backend plugin.
        prepped: True/False forces prepared/direct transfers; None prepares when a
            side's ``num_layers * num_blocks`` is at most ``max_prepped_entries``.
        max_prepped_entries: size limit for the automatic choice (~50 bytes each).
        num_threads: backend worker threads (0: backend default).
    """

    backend: str = "UCX"
    prepped: bool | None = None
    max_prepped_entries: int = 1 << 22
    num_threads: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.max_prepped_entries < 2**31:
            raise ValueError(f"NixlConfig.max_prepped_entries={self.max_prepped_entries} must be in [1, 2**31)")


@dataclass
class _Peer:
    info: PeerInfo
    metadata: bytes
    region: KVRegion
    prepped: nixl_prepped_dlist_handle | None
    layout: KVLayout  # the peer's shard, read once from its metadata


@dataclass
class _Xfer:
    handle: TransferHandle
    nixl: nixl_xfer_handle | None
    state: TransferState


class NixlKVTransferAgent(KVTransferAgent):
    """KV transfer over NIXL. Single-threaded: call it from one event loop thread.

    NOTE: the agent runs without NIXL's progress thread (it spins a core). Both
    sides therefore must call ``progress()`` regularly: the writer to move its
    transfers to DONE (only then is the transfer's notification sent), the
    receiver so that its transport accepts incoming data (TCP) and notifications.
    """

    def __init__(self, name: str, kv: torch.Tensor, model: str, config: NixlConfig = NixlConfig(),
                 tp_size: int = 1, tp_rank: int = 0, total_kv_heads: int = 0, quantization: str | None = None) -> None:
        self._layout = _checked_layout(kv, tp_size, tp_rank, total_kv_heads)
        self._kv = kv  # NOTE: keeps the registered memory alive as long as the agent
        self._config = config
        self._handshake = self._layout.handshake(model, quantization)
        self._mem_type, device_id = _mem_type(kv)
        self._region = KVRegion(kv.data_ptr(), self._layout.num_blocks, self._layout.block_bytes, device_id)
        self._nixl = _open_agent(name, config)
        self._reg = self._register()
        self._local_dlist = self._prepare(_LOCAL, self._region, self._mem_type)
        self._peers: dict[str, _Peer] = {}
        self._xfers: dict[int, _Xfer] = {}
        self._ids = itertools.count(1)
        self._inbox: list[tuple[str, bytes]] = []
        self._orphans: list[nixl_xfer_handle] = []
        self._closed = False

    # ---- identity and peers -------------------------------------------------

    @property
    def name(self) -> str:
        return self._nixl.name

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def handshake(self) -> dict[str, Any]:
        return dict(self._handshake)

    def metadata(self) -> bytes:
        self._check_open()
        return PeerInfo(
            name=self.name, handshake=self._handshake, num_blocks=self._layout.num_blocks,
            block_bytes=self._layout.block_bytes, mem_type=self._mem_type,
            device_id=self._region.device_id, base_addr=self._region.base_addr,
            transport=self._nixl.get_agent_metadata(), tp_rank=self._layout.tp_rank,
        ).encode()

    def add_peer(self, peer_name: str, metadata: bytes) -> None:
        self._check_open()
        info = PeerInfo.decode(metadata)
        if info.name != peer_name:
            raise KVTransferError(f"metadata is for KV agent {info.name!r}, not {peer_name!r}")
        if peer_name == self.name:
            raise KVTransferError(f"KV agent {peer_name!r} cannot add itself as a peer")
        check_compatible(self._handshake, info.handshake)
        layout = KVLayout.of_peer(info)
        expected = layout.block_bytes
        if info.block_bytes != expected:
            raise KVCompatibilityError(f"block_bytes: remote publishes {info.block_bytes}, its layout gives {expected}")
        old = self._peers.get(peer_name)
        if old is not None and old.metadata == metadata:
            return
        if old is not None:
            self.remove_peer(peer_name)  # a restarted peer: drop the stale entry first
        self._load_remote(peer_name, info.transport)
        region = KVRegion(info.base_addr, info.num_blocks, info.block_bytes, info.device_id)
        try:
            prepped = self._prepare(peer_name, region, info.mem_type)
        except Exception:
            _quietly(lambda: self._nixl.remove_remote_agent(peer_name), f"invalidate {peer_name!r}")
            raise
        self._peers[peer_name] = _Peer(info, bytes(metadata), region, prepped, layout)

    def remove_peer(self, peer_name: str) -> None:
        peer = self._peers.pop(peer_name, None)
        if peer is None or self._closed:
            return
        # NOTE: handles and the prepared list reference the peer's connection, so
        # they go before its metadata; using them afterwards is what crashes.
        for xfer in self._xfers.values():
            if xfer.handle.peer != peer_name:
                continue
            if not xfer.state.finished:
                xfer.state = TransferState.FAILED
            self._drop_nixl_handle(xfer)
        if peer.prepped is not None:
            _quietly(peer.prepped.release, f"release prepared list of {peer_name!r}")
        _quietly(lambda: self._nixl.remove_remote_agent(peer_name), f"invalidate {peer_name!r}")

    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    def peer_layout(self, peer_name: str) -> KVLayout:
        return self._peer(peer_name).layout

    # ---- transfers ----------------------------------------------------------

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
        peer = self._peer(peer_name)
        layers = checked_layers(layers, self._layout.num_layers)
        runs = merge_block_runs(local_block_ids, remote_block_ids)
        check_block_ids(runs, self._layout.num_blocks, "local")
        check_block_ids(runs, peer.region.num_blocks, "remote")
        if heads is not None and is_whole(heads, self._layout, peer.layout):
            heads = None
        num_blocks = sum(run.length for run in runs) * len(layers)
        if heads is None:
            nbytes, ndescs = num_blocks * self._layout.block_bytes, len(runs) * len(layers)
        else:
            rows = 2 * self._layout.block_size
            nbytes, ndescs = num_blocks * rows * heads.count * self._layout.head_bytes, num_blocks * rows
        handle = TransferHandle(next(self._ids), peer_name, nbytes, ndescs)
        if num_blocks == 0:
            if notify is not None:
                self.send_notify(peer_name, notify)
            self._xfers[handle.xfer_id] = _Xfer(handle, None, TransferState.DONE)
            return handle
        if heads is None:
            xfer = self._create_xfer(peer, runs, layers, notify or b"")
        else:
            xfer = self._create_head_xfer(peer, runs, layers, heads, notify or b"")
        # NOTE: on CPU, UCX moves DRAM between local processes with cma
        # (process_vm_writev), which copies inside the post call: the write is
        # often DONE on return and the call takes as long as the copy. Send layer
        # by layer to keep each call short; GPU transports post asynchronously.
        state = self._post(xfer, peer_name)
        self._xfers[handle.xfer_id] = _Xfer(handle, xfer, state)
        return handle

    def poll(self, handle: TransferHandle) -> TransferState:
        xfer = self._xfers.get(handle.xfer_id)
        if xfer is None:
            raise KVTransferError(f"KV transfer {handle.xfer_id} is unknown or already released")
        if not xfer.state.finished and xfer.nixl is not None:
            xfer.state = self._check(xfer.nixl)
        return xfer.state

    def release(self, handle: TransferHandle) -> None:
        xfer = self._xfers.pop(handle.xfer_id, None)
        if xfer is not None:
            self._drop_nixl_handle(xfer)

    # ---- notifications and progress ------------------------------------------

    def send_notify(self, peer_name: str, msg: bytes) -> None:
        self._check_open()
        self._peer(peer_name)
        try:
            self._nixl.send_notif(peer_name, msg)
        except Exception as exc:
            raise KVTransferError(f"notification to {peer_name!r} failed: {exc}") from exc

    def get_notifications(self) -> list[tuple[str, bytes]]:
        self.progress()
        inbox, self._inbox = self._inbox, []
        return inbox

    def progress(self) -> None:
        if self._closed:
            return
        for xfer in self._xfers.values():
            if not xfer.state.finished and xfer.nixl is not None:
                # NOTE: NIXL sends a transfer's notification only once the writer
                # has seen it DONE here; an unpolled write never notifies.
                xfer.state = self._check(xfer.nixl)
        self._retry_orphans()
        try:
            notifs = self._nixl.get_new_notifs()
        except Exception as exc:
            logger.warning("KV agent %s: reading notifications failed: %s", self.name, exc)
            return
        for sender, msgs in notifs.items():
            name = sender.decode() if isinstance(sender, bytes) else str(sender)
            self._inbox.extend((name, bytes(m)) for m in msgs)

    def close(self) -> None:
        if self._closed:
            return
        for xfer in self._xfers.values():
            self._drop_nixl_handle(xfer)
        self._xfers.clear()
        for peer_name in list(self._peers):
            self.remove_peer(peer_name)
        if self._local_dlist is not None:
            _quietly(self._local_dlist.release, "release local prepared list")
        self._retry_orphans()
        _quietly(lambda: self._nixl.deregister_memory(self._reg), "deregister KV memory")
        self._closed = True

    # ---- internals -----------------------------------------------------------

    def _register(self) -> Any:
        region = [(self._region.base_addr, self._layout.total_bytes, self._region.device_id, "")]
        try:
            return self._nixl.register_memory(region, self._mem_type, backends=[self._config.backend])
        except Exception as exc:
            raise KVTransferError(f"registering the KV cache ({self._layout.total_bytes} bytes) failed: {exc}") from exc

    def _prepare(self, agent_name: str, region: KVRegion, mem_type: str) -> nixl_prepped_dlist_handle | None:
        entries = self._layout.num_layers * region.num_blocks
        wanted = self._config.prepped
        if wanted is False or (wanted is None and entries > self._config.max_prepped_entries):
            return None
        if entries >= 2**31:
            raise KVTransferError(f"{entries} (layer, block) entries do not fit prepared int32 indices")
        if agent_name != _LOCAL and self._local_dlist is None:
            return None  # a prepared remote side needs a prepared local side
        descs = all_block_descriptors(region, self._layout.num_layers)
        try:
            return self._nixl.prep_xfer_dlist(agent_name, descs, mem_type, backends=[self._config.backend])
        except Exception as exc:
            raise KVTransferError(f"preparing {entries} descriptors for {agent_name!r} failed: {exc}") from exc

    def _load_remote(self, peer_name: str, transport: bytes) -> None:
        try:
            loaded = self._nixl.add_remote_agent(transport)
        except Exception as exc:
            raise KVTransferError(f"loading NIXL metadata of {peer_name!r} failed: {exc}") from exc
        loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if loaded != peer_name:
            _quietly(lambda: self._nixl.remove_remote_agent(loaded), f"invalidate {loaded!r}")
            raise KVTransferError(f"NIXL metadata for {peer_name!r} names agent {loaded!r}")

    def _create_xfer(self, peer: _Peer, runs: Sequence[BlockRun], layers: range, notify: bytes) -> nixl_xfer_handle:
        try:
            if peer.prepped is not None and self._local_dlist is not None:
                local = run_indices(runs, self._region.num_blocks, layers, "local")
                remote = run_indices(runs, peer.region.num_blocks, layers, "remote")
                return self._nixl.make_prepped_xfer("WRITE", self._local_dlist, local, peer.prepped, remote,
                                                    notif_msg=notify, backends=[self._config.backend])
            local = self._nixl.get_xfer_descs(run_descriptors(runs, self._region, layers, "local"), self._mem_type)
            remote = self._nixl.get_xfer_descs(run_descriptors(runs, peer.region, layers, "remote"),
                                               peer.info.mem_type)
            return self._nixl.initialize_xfer("WRITE", local, remote, peer.info.name, notify,
                                              backends=[self._config.backend])
        except Exception as exc:
            raise KVTransferError(f"creating a KV write to {peer.info.name!r} failed: {exc}") from exc

    def _create_head_xfer(self, peer: _Peer, runs: Sequence[BlockRun], layers: range, heads: HeadCopy,
                          notify: bytes) -> nixl_xfer_handle:
        """A write of some heads of each token row (peers of another tp): one descriptor per row."""
        theirs = peer.layout
        hb = self._layout.head_bytes
        local = head_descriptors(runs, self._region, layers, "local", self._layout.num_kv_heads, heads.src_first,
                                 heads.count, hb)
        remote = head_descriptors(runs, peer.region, layers, "remote", theirs.num_kv_heads, heads.dst_first,
                                  heads.count, hb)
        try:
            return self._nixl.initialize_xfer("WRITE", self._nixl.get_xfer_descs(local, self._mem_type),
                                              self._nixl.get_xfer_descs(remote, peer.info.mem_type), peer.info.name,
                                              notify, backends=[self._config.backend])
        except Exception as exc:
            raise KVTransferError(f"creating a KV head write to {peer.info.name!r} failed: {exc}") from exc

    def _post(self, xfer: nixl_xfer_handle, peer_name: str) -> TransferState:
        try:
            status = self._nixl.transfer(xfer)
        except Exception as exc:
            _quietly(xfer.release, "release refused transfer")
            raise KVTransferError(f"KV write to {peer_name!r} refused: {exc}") from exc
        if status == "ERR":
            _quietly(xfer.release, "release refused transfer")
            raise KVTransferError(f"KV write to {peer_name!r} refused by the transport")
        return TransferState.DONE if status == "DONE" else TransferState.TRANSFERRING

    def _check(self, xfer: nixl_xfer_handle) -> TransferState:
        try:
            status = self._nixl.check_xfer_state(xfer)
        except Exception as exc:
            logger.warning("KV agent %s: transfer failed: %s", self.name, exc)
            return TransferState.FAILED
        if status == "DONE":
            return TransferState.DONE
        return TransferState.TRANSFERRING if status == "PROC" else TransferState.FAILED

    def _drop_nixl_handle(self, xfer: _Xfer) -> None:
        """Release the NIXL handle (aborting an unfinished write where possible)."""
        handle, xfer.nixl = xfer.nixl, None
        if handle is None:
            return
        try:
            handle.release()
        except Exception as exc:
            # NOTE: NIXL refuses to free a write it cannot abort yet; keep the handle
            # and retry from progress() so its request is not leaked.
            logger.info("KV agent %s: deferring release of an in-flight write: %s", self.name, exc)
            self._orphans.append(handle)

    def _retry_orphans(self) -> None:
        still: list[nixl_xfer_handle] = []
        for handle in self._orphans:
            try:
                handle.release()
            except Exception:
                still.append(handle)
        self._orphans = still

    def _peer(self, peer_name: str) -> _Peer:
        peer = self._peers.get(peer_name)
        if peer is None:
            raise KVTransferError(f"unknown KV peer {peer_name!r}; known: {sorted(self._peers)}")
        return peer

    def _check_open(self) -> None:
        if self._closed:
            raise KVTransferError(f"KV agent {self.name!r} is closed")


def _checked_layout(kv: torch.Tensor, tp_size: int, tp_rank: int, total_kv_heads: int) -> KVLayout:
    if not kv.is_contiguous():
        raise ValueError("the KV tensor must be contiguous: it is registered as one region")
    return KVLayout.for_tensor(kv, tp_size, tp_rank, total_kv_heads)


def _mem_type(kv: torch.Tensor) -> tuple[str, int]:
    """NIXL memory type and device id of the KV tensor."""
    if kv.device.type == "cuda":
        return "VRAM", kv.device.index if kv.device.index is not None else torch.cuda.current_device()
    if kv.device.type == "cpu":
        return "DRAM", 0
    raise ValueError(f"KV tensor on {kv.device}: only cpu (DRAM) and cuda (VRAM) are supported")


def _open_agent(name: str, config: NixlConfig) -> nixl_agent:
    conf = nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False,
                             backends=[config.backend], num_threads=config.num_threads)
    try:
        agent = nixl_agent(name, conf)
    except Exception as exc:
        raise KVTransferError(f"creating NIXL agent {name!r} with backend {config.backend} failed: {exc}") from exc
    if config.backend not in agent.backends:
        raise KVTransferError(f"NIXL backend {config.backend!r} is not available; plugins: {agent.get_plugin_list()}")
    return agent


def _quietly(action: Any, what: str) -> None:
    """Run a best-effort cleanup step; log instead of raising."""
    try:
        action()
    except Exception as exc:
        logger.warning("KV transfer cleanup: %s failed: %s", what, exc)
