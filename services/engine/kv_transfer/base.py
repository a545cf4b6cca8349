"""The KV transfer interface: how one worker writes KV blocks into another's cache.

Owns: ``KVLayout`` (the byte layout of a worker's KV tensor and the handshake that
decides whether two workers may exchange blocks), ``TransferState`` and
``TransferHandle``, the error types, the metadata envelope (``PeerInfo``), the
abstract ``KVTransferAgent`` and the async ``wait`` helper. No transport code and
no grpc/etcd: metadata travels as bytes that the caller publishes.

Lifecycle of an agent:
  construct (the KV tensor is registered once) -> ``metadata()`` is published by
  the caller -> ``add_peer(name, metadata)`` for each peer (compatibility check)
  -> ``write_blocks`` / ``send_notify`` / ``get_notifications``, with
  ``progress()`` driven from the caller's event loop -> ``remove_peer(name)`` when
  the peer leaves or restarts (a restarted peer is added again with its new
  metadata) -> ``close()``.

Lifecycle of one transfer:
  ``write_blocks`` -> PENDING or TRANSFERRING -> (``poll`` / ``progress``) ->
  DONE or FAILED -> ``release``. A handle is valid until released.
"""
from __future__ import annotations

import abc
import asyncio
import enum
import hashlib
import json
import struct
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pdserve.common.kv_compat import SPLIT_FIELDS, handshake_diffs
from pdserve.engine.dtypes import ITEMSIZE

PROTOCOL_VERSION = 1
KV_LAYOUT_NAME = "layer,block,kv,token,head,dim"
_MAGIC = b"PDKV"
_HEADER = struct.Struct(">4sHI")  # magic, protocol version, JSON header length


class KVTransferError(RuntimeError):
    """A KV transfer could not be started, failed, or the agent is misused."""


class KVCompatibilityError(KVTransferError):
    """Two workers' KV caches cannot exchange blocks; the message names the field."""


class KVTransferTimeout(KVTransferError, TimeoutError):
    """A wait on a transfer did not finish within its timeout."""


class TransferState(enum.Enum):
    PENDING = "pending"  # accepted, not yet handed to the transport
    TRANSFERRING = "transferring"  # posted; bytes may be landing in the peer
    DONE = "done"  # every byte is in the peer's memory; its notification is sent
    FAILED = "failed"  # the transport reported an error or the peer went away

    @property
    def finished(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


@dataclass(frozen=True)
class TransferHandle:
    """Opaque ticket for one ``write_blocks`` call; the agent holds the state."""

    xfer_id: int
    peer: str
    num_bytes: int
    num_descs: int


@dataclass(frozen=True)
class KVLayout:
    """Shape of ``kv = empty(num_layers, num_blocks, 2, block_size, heads, head_dim)``.

    (layer l, block b) is one contiguous chunk of ``block_bytes`` at byte offset
    ``(l * num_blocks + b) * block_bytes``; dim 2 holds K then V. The tensor is
    rank ``tp_rank``'s shard of a worker whose ``total_kv_heads`` are split over
    (or replicated across) ``tp_size`` ranks; ``num_kv_heads`` is the shard's.
    """

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    device: str = "cpu"
    tp_size: int = 1
    tp_rank: int = 0
    total_kv_heads: int = 0  # 0: the shard holds every head (tp_size 1)

    def __post_init__(self) -> None:
        if self.total_kv_heads == 0:
            object.__setattr__(self, "total_kv_heads", self.num_kv_heads * self.tp_size)
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim", "tp_size",
                     "total_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVLayout.{name}={value!r} is invalid: expected an integer >= 1")
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"KVLayout.dtype={self.dtype!r} is invalid: expected one of {sorted(ITEMSIZE)}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"KVLayout.device={self.device!r} is invalid: expected 'cpu' or 'cuda[:N]'")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KVLayout.tp_rank={self.tp_rank} is invalid: expected 0 <= tp_rank < {self.tp_size}")
        expected = len(shard_heads(self.total_kv_heads, self.tp_size, self.tp_rank))
        if self.num_kv_heads != expected:
            raise ValueError(f"KVLayout.num_kv_heads={self.num_kv_heads}: rank {self.tp_rank} of tp={self.tp_size} "
                             f"holds {expected} of {self.total_kv_heads} KV heads")

    @classmethod
    def for_tensor(cls, kv: Any, tp_size: int = 1, tp_rank: int = 0, total_kv_heads: int = 0) -> "KVLayout":
        """The layout of an existing KV tensor (anything with shape/dtype/device), rank
        ``tp_rank``'s shard of a worker split over ``tp_size`` ranks."""
        if len(kv.shape) != 6 or kv.shape[2] != 2:
            raise ValueError(f"KV tensor shape {tuple(kv.shape)} is not "
                             "(num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim)")
        layers, blocks, _, block_size, heads, head_dim = (int(d) for d in kv.shape)
        dtype = str(kv.dtype).removeprefix("torch.")
        return cls(layers, blocks, block_size, heads, head_dim, dtype, str(kv.device), tp_size, tp_rank,
                   total_kv_heads)

    @classmethod
    def of_peer(cls, info: "PeerInfo") -> "KVLayout":
        """A peer's shard layout, from what it published."""
        h = info.handshake
        return cls(int(h["num_layers"]), info.num_blocks, int(h["block_size"]),
                   len(shard_heads(int(h["num_kv_heads"]), int(h["tp_size"]), info.tp_rank)), int(h["head_dim"]),
                   str(h["dtype"]), "cpu", int(h["tp_size"]), info.tp_rank, int(h["num_kv_heads"]))

    @property
    def heads(self) -> range:
        """The model's KV heads this shard holds."""
        return shard_heads(self.total_kv_heads, self.tp_size, self.tp_rank)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, self.num_blocks, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def head_bytes(self) -> int:
        """Bytes of one head of one token (K or V)."""
        return self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one (layer, block): K and V for ``block_size`` tokens."""
        return 2 * self.block_size * self.num_kv_heads * self.head_bytes

    @property
    def layer_stride_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.layer_stride_bytes

    def handshake(self, model: str, quantization: str | None = None) -> dict[str, Any]:
        """What two peers must agree on (``num_blocks``, device and the head split
        ``tp_size`` may differ); ``num_kv_heads`` is the model's, not the shard's.
        ``quantization`` is the weights' scheme (None: unquantized): the KV cache is in
        the activation dtype either way, but prefill and decode must run the same weights."""
        return {
            "protocol_version": PROTOCOL_VERSION,
            "model": model,
            "quantization": quantization or "none",
            "dtype": self.dtype,
            "block_size": self.block_size,
            "kv_layout": KV_LAYOUT_NAME,
            "num_layers": self.num_layers,
            "num_kv_heads": self.total_kv_heads,
            "head_dim": self.head_dim,
            "tp_size": self.tp_size,
        }

    def compat_key(self, model: str) -> str:
        """A short stable hash of the fields of ``handshake(model)`` that must agree."""
        shared = {k: v for k, v in self.handshake(model).items() if k not in SPLIT_FIELDS}
        canonical = json.dumps(shared, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def shard_heads(total: int, tp: int, rank: int) -> range:
    """The KV heads rank ``rank`` of ``tp`` holds: an even split, or (fewer heads than
    ranks) one head shared by ``tp // total`` consecutive ranks."""
    if total >= tp:
        per = total // tp
        return range(rank * per, (rank + 1) * per)
    first = rank // (tp // total)
    return range(first, first + 1)


def check_compatible(local: Mapping[str, Any], remote: Mapping[str, Any]) -> None:
    """Raise ``KVCompatibilityError`` naming every field where the handshakes differ
    (the head split, ``tp_size``, may differ: transfers map head ranges).

    Example message: ``block_size: local 16 != remote 32``.
    """
    diffs = [f"{k}: local {a!r} != remote {b!r}" for k, a, b in handshake_diffs(local, remote)]
    if diffs:
        raise KVCompatibilityError("incompatible KV peer: " + "; ".join(diffs))


@dataclass(frozen=True)
class PeerInfo:
    """Everything a peer publishes: handshake, where its KV tensor lives, and the
    transport's own connection blob (e.g. NIXL agent metadata)."""

    name: str
    handshake: Mapping[str, Any]
    num_blocks: int
    block_bytes: int
    mem_type: str
    device_id: int
    base_addr: int
    transport: bytes
    tp_rank: int = 0

    def encode(self) -> bytes:
        header = json.dumps({
            "name": self.name, "handshake": dict(self.handshake), "num_blocks": self.num_blocks,
            "block_bytes": self.block_bytes, "mem_type": self.mem_type, "device_id": self.device_id,
            "base_addr": self.base_addr, "tp_rank": self.tp_rank,
        }, sort_keys=True).encode()
        return _HEADER.pack(_MAGIC, PROTOCOL_VERSION, len(header)) + header + self.transport

    @classmethod
    def decode(cls, data: bytes) -> "PeerInfo":
        """Parse ``encode()`` output; a foreign or other-version blob is a compat error."""
        if len(data) < _HEADER.size:
            raise KVCompatibilityError(f"KV peer metadata too short ({len(data)} bytes)")
        magic, version, length = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise KVCompatibilityError(f"KV peer metadata has magic {magic!r}, expected {_MAGIC!r}")
        if version != PROTOCOL_VERSION:
            raise KVCompatibilityError(f"protocol_version: local {PROTOCOL_VERSION} != remote {version}")
        header = json.loads(data[_HEADER.size:_HEADER.size + length])
        return cls(transport=bytes(data[_HEADER.size + length:]), **header)


class KVTransferAgent(abc.ABC):
    """One worker's endpoint for moving KV blocks to peers.

    Single-threaded: every method is called from the owner's event loop thread and
    none blocks. The owner calls ``progress()`` periodically (e.g. every loop
    tick while transfers or peers are active); nothing spins in the background.
    """

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """This agent's name, unique in the cluster; peers address us by it."""

    @property
    @abc.abstractmethod
    def layout(self) -> KVLayout:
        """The layout of the registered KV tensor."""

    @property
    @abc.abstractmethod
    def handshake(self) -> dict[str, Any]:
        """What a peer must agree with (``KVLayout.handshake``); published with the metadata."""

    @abc.abstractmethod
    def metadata(self) -> bytes:
        """Bytes a peer passes to ``add_peer`` to reach us (publish them, e.g. in etcd)."""

    @abc.abstractmethod
    def add_peer(self, peer_name: str, metadata: bytes) -> None:
        """Load a peer's metadata so we can write to it and notify it.

        Adding a known peer with identical metadata is a no-op; different metadata
        under the same name (a restarted peer) replaces the old entry.

        Args:
            peer_name: the name the peer published; must match its metadata.
            metadata: the peer's ``metadata()`` bytes.

        Raises:
            KVCompatibilityError: model, dtype, block size, layout or protocol
                version differ; the message names the field and both values.
            KVTransferError: the name does not match or the transport refused it.
        """

    @abc.abstractmethod
    def remove_peer(self, peer_name: str) -> None:
        """Forget a peer: fail its in-flight transfers, drop its metadata. Idempotent."""

    @abc.abstractmethod
    def peers(self) -> frozenset[str]:
        """Names of the peers currently loaded."""

    @abc.abstractmethod
    def peer_layout(self, peer_name: str) -> KVLayout:
        """A loaded peer's shard layout (its tp, rank and heads included)."""

    def rank_metadata(self) -> list[bytes]:
        """Metadata of the agents of this worker's further ranks (tp > 1), in rank order."""
        return []

    @abc.abstractmethod
    def write_blocks(
        self,
        peer_name: str,
        local_block_ids: Sequence[int],
        remote_block_ids: Sequence[int],
        layers: range | None = None,
        notify: bytes | None = None,
        heads: Any = None,
    ) -> TransferHandle:
        """Start writing our blocks into the peer's blocks; returns at once.

        Args:
            peer_name: a peer loaded with ``add_peer``.
            local_block_ids: our block ids, in order.
            remote_block_ids: the peer's block ids; ``remote[i]`` receives ``local[i]``.
            layers: the layers to send (default all). Sending ``range(l, l + 1)`` as
                soon as layer ``l`` is computed overlaps transfer with compute.
            notify: delivered to the peer's ``get_notifications()`` after every byte
                of THIS transfer has landed (it says nothing about other transfers).
            heads: a ``heads.HeadCopy`` (peers of another tp): only those KV heads
                of each block, at their offsets in either shard. None: whole blocks.

        Returns:
            A handle to ``poll`` and, once finished, ``release``.

        Raises:
            ValueError: bad block ids (lengths differ, out of range) or layers.
            KVTransferError: unknown peer, or the transport refused the transfer
                (e.g. the peer is gone).
        """

    @abc.abstractmethod
    def poll(self, handle: TransferHandle) -> TransferState:
        """The transfer's state now; never blocks."""

    @abc.abstractmethod
    def release(self, handle: TransferHandle) -> None:
        """Free the handle. An unfinished transfer is aborted where the transport
        can; the peer's blocks must still be treated as possibly written."""

    @abc.abstractmethod
    def send_notify(self, peer_name: str, msg: bytes) -> None:
        """Send a standalone message to a peer (not tied to any transfer)."""

    @abc.abstractmethod
    def get_notifications(self) -> list[tuple[str, bytes]]:
        """Messages received since the last call, as (sender name, message)."""

    @abc.abstractmethod
    def progress(self) -> None:
        """One non-blocking pass: advance in-flight transfers, collect notifications."""

    @abc.abstractmethod
    def close(self) -> None:
        """Abort transfers, drop peers, deregister memory. Idempotent."""

    def __enter__(self) -> "KVTransferAgent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def wait(
    agent: KVTransferAgent,
    handles: TransferHandle | Sequence[TransferHandle],
    timeout: float,
    poll_interval: float = 0.0005,
) -> None:
    """Wait until every handle is DONE, yielding to the event loop between polls.

    Raises:
        KVTransferError: a transfer FAILED (the message names the peer).
        KVTransferTimeout: not all DONE within ``timeout`` seconds. The handles
            stay valid: the caller decides whether to release (abort) them.
    """
    pending = [handles] if isinstance(handles, TransferHandle) else list(handles)
    deadline = time.monotonic() + timeout
    while True:
        agent.progress()
        states = [(h, agent.poll(h)) for h in pending]
        failed = [h for h, s in states if s is TransferState.FAILED]
        if failed:
            raise KVTransferError(f"KV transfer {failed[0].xfer_id} to {failed[0].peer!r} failed")
        pending = [h for h, s in states if s is not TransferState.DONE]
        if not pending:
            return
        if time.monotonic() >= deadline:
            peers = sorted({h.peer for h in pending})
            raise KVTransferTimeout(f"{len(pending)} KV transfer(s) to {peers} not done after {timeout:.3f} s")
        await asyncio.sleep(poll_interval)
