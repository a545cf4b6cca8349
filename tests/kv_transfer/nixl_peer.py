"""A KV worker in its own OS process, driven over a pipe, for the NIXL tests.

Owns: the child side (``serve``: one ``NixlKVTransferAgent`` over a seeded random
KV tensor, a command loop that keeps calling ``progress()`` while idle) and the
parent side (``PeerProcess``: start, call with a timeout, kill). Each parent
call is bounded by a timeout and every process is killed by the test fixture,
so a wedged transfer fails the test instead of hanging it.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

import torch

from pdserve.engine.kv_transfer.base import KVLayout, wait


class RemoteError(Exception):
    """A command failed in the child; ``kind`` is the exception's class name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class PeerSpec:
    name: str
    layout: KVLayout
    seed: int
    model: str = "test-model"
    prepped: bool | None = None


def make_kv(layout: KVLayout, seed: int) -> torch.Tensor:
    """Deterministic random KV contents (never zeros), same in every process."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(layout.shape, generator=gen, dtype=torch.float32) + 0.5
    return data.to(getattr(torch, layout.dtype)).contiguous()


def kv_from_bytes(data: bytes, layout: KVLayout) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(getattr(torch, layout.dtype)).reshape(layout.shape)


# ---- child side -------------------------------------------------------------


class _Worker:
    def __init__(self, spec: PeerSpec) -> None:
        from pdserve.engine.kv_transfer.nixl_connector import NixlConfig, NixlKVTransferAgent

        self.kv = make_kv(spec.layout, spec.seed)
        self.agent = NixlKVTransferAgent(spec.name, self.kv, spec.model, NixlConfig(prepped=spec.prepped))
        self.handles: dict[int, Any] = {}
        self.notifs: list[tuple[str, bytes]] = []

    def pump(self) -> None:
        self.notifs.extend(self.agent.get_notifications())

    def add_peer(self, name: str, metadata: bytes) -> None:
        self.agent.add_peer(name, metadata)

    def remove_peer(self, name: str) -> None:
        self.agent.remove_peer(name)

    def write(self, peer: str, src: list[int], dst: list[int], layers: tuple[int, int] | None,
              notify: bytes | None, timeout: float) -> dict[str, int]:
        span = None if layers is None else range(*layers)
        handle = self.agent.write_blocks(peer, src, dst, layers=span, notify=notify)
        try:
            asyncio.run(wait(self.agent, handle, timeout))
        finally:
            self.agent.release(handle)
        return {"num_descs": handle.num_descs, "num_bytes": handle.num_bytes}

    def write_layerwise(self, peer: str, src: list[int], dst: list[int], notify: bytes, timeout: float) -> int:
        handles = [self.agent.write_blocks(peer, src, dst, layers=range(layer, layer + 1))
                   for layer in range(self.agent.layout.num_layers)]
        try:
            asyncio.run(wait(self.agent, handles, timeout))
        finally:
            for handle in handles:
                self.agent.release(handle)
        # NOTE: a notification covers only its own transfer, so the "all layers
        # landed" message goes out after every per-layer write is DONE.
        self.agent.send_notify(peer, notify)
        return sum(h.num_descs for h in handles)

    def notify(self, peer: str, msg: bytes) -> None:
        self.agent.send_notify(peer, msg)

    def submit(self, peer: str, src: list[int], dst: list[int], notify: bytes | None) -> int:
        handle = self.agent.write_blocks(peer, src, dst, notify=notify)
        self.handles[handle.xfer_id] = handle
        return handle.xfer_id

    def wait(self, xfer_id: int, timeout: float) -> float:
        start = time.monotonic()
        asyncio.run(wait(self.agent, self.handles[xfer_id], timeout))
        return time.monotonic() - start

    def release(self, xfer_id: int) -> None:
        self.agent.release(self.handles.pop(xfer_id))

    def take_notifs(self, count: int, timeout: float) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.notifs) < count and time.monotonic() < deadline:
            self.pump()
            time.sleep(0.0005)
        out, self.notifs = self.notifs, []
        return out

    def kv_bytes(self) -> bytes:
        self.pump()
        return self.kv.view(torch.uint8).numpy().tobytes()


def serve(conn: Connection, spec_fields: dict[str, Any]) -> None:
    """Child entry point: build the agent, answer commands, progress while idle."""
    spec = PeerSpec(**{**spec_fields, "layout": KVLayout(**spec_fields["layout"])})
    worker = _Worker(spec)
    conn.send(("ok", worker.agent.metadata()))
    while True:
        if not conn.poll(0.0005):
            worker.pump()
            continue
        command, args = conn.recv()
        if command == "stop":
            worker.agent.close()
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(worker, command)(*args)))
        except Exception as exc:  # reported to the parent, which re-raises
            conn.send(("err", type(exc).__name__, str(exc)))


# ---- parent side ------------------------------------------------------------


class PeerProcess:
    """Parent handle on one child KV worker."""

    def __init__(self, spec: PeerSpec) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.spec = spec
        self.conn, child_conn = ctx.Pipe()
        fields = {**asdict(spec), "layout": asdict(spec.layout)}
        self.proc = ctx.Process(target=serve, args=(child_conn, fields), daemon=True)
        self.proc.start()
        self._metadata: bytes | None = None

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def metadata(self, timeout: float = 30.0) -> bytes:
        if self._metadata is None:
            self._metadata = self._reply(timeout)
        return self._metadata

    def call(self, command: str, *args: Any, timeout: float = 15.0) -> Any:
        self.metadata()
        self.conn.send((command, args))
        return self._reply(timeout)

    def _reply(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"KV peer {self.spec.name!r} (pid {self.proc.pid}) gave no reply in {timeout} s")
        reply = self.conn.recv()
        if reply[0] == "err":
            raise RemoteError(reply[1], reply[2])
        return reply[1]

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=10)


def connect(a: PeerProcess, b: PeerProcess) -> None:
    """Exchange metadata both ways, as two workers do through etcd."""
    a.call("add_peer", b.spec.name, b.metadata())
    b.call("add_peer", a.spec.name, a.metadata())


def expected_after_write(dst_kv: torch.Tensor, src_kv: torch.Tensor, src: list[int], dst: list[int],
                         layers: range) -> torch.Tensor:
    out = dst_kv.clone()
    for layer in layers:
        out[layer, dst] = src_kv[layer, src]
    return out


Starter = Callable[[PeerSpec], PeerProcess]
