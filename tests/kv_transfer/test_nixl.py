"""Real NIXL (UCX over loopback) between real OS processes.

Each test starts its KV workers as spawned child processes (``nixl_peer.py``),
exchanges metadata through pipes, and kills every child at teardown even when
the test fails. Bytes are checked exactly: the written blocks hold the writer's
data and every other block of the receiver is untouched.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import time
from typing import Iterator

import pytest
import torch

from pdserve.engine.kv_transfer.base import KVLayout
from tests.kv_transfer.nixl_peer import (
    PeerProcess,
    PeerSpec,
    RemoteError,
    Starter,
    connect,
    expected_after_write,
    kv_from_bytes,
    make_kv,
)

pytestmark = [
    pytest.mark.timeout(60),
    # find_spec, not import: NIXL is loaded only in the child processes
    pytest.mark.skipif(importlib.util.find_spec("nixl") is None, reason="nixl is not installed"),
]

SMALL = KVLayout(num_layers=3, num_blocks=24, block_size=16, num_kv_heads=2, head_dim=32, dtype="float32")
SRC = [0, 1, 2, 5, 9, 10, 11, 20]
DST = [3, 4, 5, 0, 12, 13, 17, 23]  # runs: (0-2 -> 3-5), (5 -> 0), (9-10 -> 12-13), (11 -> 17), (20 -> 23)
NUM_RUNS = 5


@pytest.fixture
def start() -> Iterator[Starter]:
    """Start child KV workers; all of them are killed when the test ends."""
    started: list[PeerProcess] = []

    def _start(spec: PeerSpec) -> PeerProcess:
        peer = PeerProcess(spec)
        started.append(peer)
        return peer

    yield _start
    for peer in started:
        _resume(peer)
        peer.kill()


def _resume(peer: PeerProcess) -> None:
    if peer.proc.is_alive():
        os.kill(peer.pid, signal.SIGCONT)


def _received(peer: PeerProcess, layout: KVLayout) -> torch.Tensor:
    return kv_from_bytes(peer.call("kv_bytes"), layout)


@pytest.mark.parametrize("prepped", [True, False], ids=["prepped", "direct"])
def test_write_merged_runs_then_notify(start: Starter, prepped: bool) -> None:
    a = start(PeerSpec("A", SMALL, seed=1, prepped=prepped))
    b = start(PeerSpec("B", SMALL, seed=2, prepped=prepped))
    connect(a, b)

    info = a.call("write", "B", SRC, DST, None, b"req-1:done", 10.0)

    assert info["num_descs"] == NUM_RUNS * SMALL.num_layers
    assert info["num_bytes"] == len(SRC) * SMALL.num_layers * SMALL.block_bytes
    assert b.call("take_notifs", 1, 10.0) == [("A", b"req-1:done")]
    want = expected_after_write(make_kv(SMALL, 2), make_kv(SMALL, 1), SRC, DST, range(SMALL.num_layers))
    assert _received(b, SMALL).equal(want)
    b.call("notify", "A", b"req-1:ack")  # standalone message the other way
    assert a.call("take_notifs", 1, 10.0) == [("B", b"req-1:ack")]


def test_layerwise_writes_bfloat16(start: Starter) -> None:
    layout = KVLayout(num_layers=4, num_blocks=16, block_size=16, num_kv_heads=2, head_dim=64, dtype="bfloat16")
    a = start(PeerSpec("A", layout, seed=3))
    b = start(PeerSpec("B", layout, seed=4))
    connect(a, b)
    src, dst = [1, 2, 3, 8], [10, 11, 12, 0]

    one_layer = a.call("write", "B", src, dst, (2, 3), None, 10.0)
    assert one_layer["num_descs"] == 2
    want = expected_after_write(make_kv(layout, 4), make_kv(layout, 3), src, dst, range(2, 3))
    assert _received(b, layout).equal(want)

    descs = a.call("write_layerwise", "B", src, dst, b"req-2:all-layers", 10.0)
    assert descs == 2 * layout.num_layers
    assert b.call("take_notifs", 1, 10.0) == [("A", b"req-2:all-layers")]
    want = expected_after_write(make_kv(layout, 4), make_kv(layout, 3), src, dst, range(layout.num_layers))
    assert _received(b, layout).equal(want)


def test_incompatible_peer_names_field_and_both_values(start: Starter) -> None:
    other = KVLayout(num_layers=3, num_blocks=24, block_size=32, num_kv_heads=2, head_dim=32, dtype="bfloat16")
    a = start(PeerSpec("A", SMALL, seed=1))
    b = start(PeerSpec("B", other, seed=2))
    assert other.block_bytes == SMALL.block_bytes  # same bytes per block: only the handshake catches it

    with pytest.raises(RemoteError) as err:
        a.call("add_peer", "B", b.metadata())
    assert err.value.kind == "KVCompatibilityError"
    assert "block_size: local 16 != remote 32" in err.value.message
    assert "dtype: local 'float32' != remote 'bfloat16'" in err.value.message

    with pytest.raises(RemoteError) as err:
        b.call("add_peer", "A", a.metadata())
    assert "block_size: local 32 != remote 16" in err.value.message
    with pytest.raises(RemoteError, match="unknown KV peer 'B'"):
        a.call("write", "B", [0], [0], None, None, 1.0)


def test_restarted_peer_is_reachable_after_remove_and_add(start: Starter) -> None:
    a = start(PeerSpec("A", SMALL, seed=1))
    b1 = start(PeerSpec("B", SMALL, seed=2))
    b2_spec = PeerSpec("B", SMALL, seed=5)
    connect(a, b1)
    a.call("write", "B", [0], [1], None, b"first", 10.0)
    assert b1.call("take_notifs", 1, 10.0) == [("A", b"first")]

    b1.kill()
    with pytest.raises(RemoteError) as err:  # stale metadata: fails or times out, never hangs
        a.call("write", "B", [0], [1], None, None, 3.0)
    assert err.value.kind in ("KVTransferError", "KVTransferTimeout")

    b2 = start(b2_spec)
    a.call("remove_peer", "B")
    connect(a, b2)
    a.call("write", "B", SRC, DST, None, b"second", 10.0)

    assert b2.call("take_notifs", 1, 10.0) == [("A", b"second")]
    want = expected_after_write(make_kv(SMALL, 5), make_kv(SMALL, 1), SRC, DST, range(SMALL.num_layers))
    assert _received(b2, SMALL).equal(want)


def test_wait_times_out_on_a_wedged_peer(start: Starter) -> None:
    big = KVLayout(num_layers=2, num_blocks=64, block_size=16, num_kv_heads=8, head_dim=64, dtype="float32")
    a = start(PeerSpec("A", big, seed=1))
    b = start(PeerSpec("B", big, seed=2))
    connect(a, b)
    blocks = list(range(big.num_blocks))
    os.kill(b.pid, signal.SIGSTOP)  # the peer stops progressing: the write cannot finish
    try:
        xfer = a.call("submit", "B", blocks, blocks, b"never")
        started = time.monotonic()
        with pytest.raises(RemoteError) as err:
            a.call("wait", xfer, 0.5)
        assert err.value.kind == "KVTransferTimeout"
        assert time.monotonic() - started < 5.0
        a.call("release", xfer)  # aborts the write
    finally:
        _resume(b)

    a.call("write", "B", [3], [4], None, b"after", 10.0)
    assert ("A", b"after") in b.call("take_notifs", 1, 10.0)


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_idle_agent_does_not_spin_a_core(start: Starter) -> None:
    a = start(PeerSpec("A", SMALL, seed=1))
    a.metadata()  # ready; its loop now calls progress() every 0.5 ms
    before, started = _cpu_seconds(a.pid), time.monotonic()
    time.sleep(1.5)
    used = (_cpu_seconds(a.pid) - before) / (time.monotonic() - started)
    assert used < 0.25, f"idle KV agent used {used:.2f} of a core (NIXL's progress thread spins)"
