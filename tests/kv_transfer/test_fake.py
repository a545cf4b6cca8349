"""The in-process fake keeps the interface's contract (so other components'
unit tests can trust it), and ``wait`` honours its timeout."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from pdserve.engine.kv_transfer.base import (
    KVCompatibilityError,
    KVLayout,
    KVTransferError,
    KVTransferTimeout,
    TransferState,
    wait,
)
from pdserve.engine.kv_transfer.fake import FakeKVRegistry, FakeKVTransferAgent

LAYOUT = KVLayout(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=1, head_dim=4, dtype="float32")


def make_agent(name: str, registry: FakeKVRegistry, seed: int, layout: KVLayout = LAYOUT) -> FakeKVTransferAgent:
    kv = torch.randn(layout.shape, generator=torch.Generator().manual_seed(seed)).to(getattr(torch, layout.dtype))
    return FakeKVTransferAgent(name, kv, "m", registry)


@pytest.fixture
def pair() -> tuple[FakeKVTransferAgent, FakeKVTransferAgent]:
    registry = FakeKVRegistry()
    a, b = make_agent("A", registry, 1), make_agent("B", registry, 2)
    a.add_peer("B", b.metadata())
    b.add_peer("A", a.metadata())
    return a, b


def test_write_copies_on_progress_and_notifies(pair) -> None:
    a, b = pair
    before = b.kv.clone()
    handle = a.write_blocks("B", [0, 1, 5], [6, 7, 2], layers=range(1, 2), notify=b"req")
    assert handle.num_descs == 2 and handle.num_bytes == 3 * LAYOUT.block_bytes
    assert b.kv.equal(before) and b.get_notifications() == []
    asyncio.run(wait(a, handle, timeout=1.0))
    assert a.poll(handle) is TransferState.DONE
    want = before.clone()
    want[1, [6, 7, 2]] = a.kv[1, [0, 1, 5]]
    assert b.kv.equal(want)
    assert b.get_notifications() == [("A", b"req")]
    a.release(handle)
    with pytest.raises(KVTransferError, match="unknown or already released"):
        a.poll(handle)


def test_paused_transfer_times_out_then_completes(pair) -> None:
    a, b = pair
    a.pause()
    handle = a.write_blocks("B", [0], [0])
    started = time.monotonic()
    with pytest.raises(KVTransferTimeout, match=r"1 KV transfer\(s\) to \['B'\] not done after 0.050 s"):
        asyncio.run(wait(a, handle, timeout=0.05))
    assert time.monotonic() - started < 1.0
    assert a.poll(handle) is TransferState.TRANSFERRING
    a.resume()
    asyncio.run(wait(a, [handle], timeout=1.0))


def test_failed_transfer_raises_in_wait(pair) -> None:
    a, b = pair
    before = b.kv.clone()
    a.fail_next()
    handle = a.write_blocks("B", [1], [1], notify=b"x")
    with pytest.raises(KVTransferError, match="to 'B' failed"):
        asyncio.run(wait(a, handle, timeout=1.0))
    assert b.kv.equal(before) and b.get_notifications() == []


def test_restarted_peer_needs_its_new_metadata() -> None:
    registry = FakeKVRegistry()
    a, b1 = make_agent("A", registry, 1), make_agent("B", registry, 2)
    a.add_peer("B", b1.metadata())
    pending = a.write_blocks("B", [0], [0])
    b1.close()
    assert a.poll(pending) is TransferState.FAILED
    b2 = make_agent("B", registry, 3)
    with pytest.raises(KVTransferError, match="gone"):
        a.write_blocks("B", [0], [0])
    a.remove_peer("B")
    a.add_peer("B", b2.metadata())
    asyncio.run(wait(a, a.write_blocks("B", [0], [0], notify=b"hi"), timeout=1.0))
    assert b2.get_notifications() == [("A", b"hi")]


def test_compatibility_and_misuse_errors() -> None:
    registry = FakeKVRegistry()
    a = make_agent("A", registry, 1)
    other = KVLayout(num_layers=2, num_blocks=8, block_size=8, num_kv_heads=1, head_dim=4, dtype="float32")
    c = make_agent("C", registry, 2, other)
    with pytest.raises(KVCompatibilityError, match="block_size: local 4 != remote 8"):
        a.add_peer("C", c.metadata())
    with pytest.raises(KVTransferError, match="metadata is for KV agent 'C', not 'D'"):
        a.add_peer("D", c.metadata())
    with pytest.raises(KVTransferError, match="unknown KV peer 'C'"):
        a.write_blocks("C", [0], [0])
    b = make_agent("B", registry, 3)
    a.add_peer("B", b.metadata())
    with pytest.raises(ValueError, match="remote block id 8 out of range"):
        a.write_blocks("B", [0], [8])
    with pytest.raises(ValueError, match="layers range\\(0, 3\\) out of range"):
        a.write_blocks("B", [0], [0], layers=range(3))
    with pytest.raises(KVTransferError, match="already live"):
        make_agent("B", registry, 4)


def test_handshake_lets_the_tp_split_differ_but_not_the_model_heads():
    from pdserve.engine.kv_transfer.base import KVCompatibilityError, KVLayout, check_compatible

    four = KVLayout(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=4, head_dim=4, dtype="float32")
    half = KVLayout(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=4, dtype="float32",
                    tp_size=2, tp_rank=1, total_kv_heads=4)
    check_compatible(four.handshake("m"), half.handshake("m"))  # tp 1 vs 2 of the same 4 heads: fine
    assert four.compat_key("m") == half.compat_key("m")
    with pytest.raises(ValueError, match="holds 4 of 8"):  # rank 0 of 8 heads over 2 ranks holds 4, not 2
        KVLayout(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=4, dtype="float32",
                 tp_size=2, tp_rank=0, total_kv_heads=8)
    with pytest.raises(KVCompatibilityError, match="num_kv_heads: local 4 != remote 2"):
        check_compatible(four.handshake("m"), KVLayout(2, 8, 4, 2, 4, "float32").handshake("m"))


def test_fake_moves_head_ranges_between_tp_layouts():
    """tp=1 (4 heads) -> tp=2 (2 heads each): each destination rank gets its heads."""
    from pdserve.engine.kv_transfer.heads import write_to_worker

    registry = FakeKVRegistry()
    src = torch.randn(2, 8, 2, 4, 4, 4)
    a = FakeKVTransferAgent("P", src, "m", registry)
    d0 = FakeKVTransferAgent("D", torch.zeros(2, 8, 2, 4, 2, 4), "m", registry, tp_size=2, tp_rank=0, total_kv_heads=4)
    d1 = FakeKVTransferAgent("D.r1", torch.zeros(2, 8, 2, 4, 2, 4), "m", registry, tp_size=2, tp_rank=1,
                             total_kv_heads=4)
    for peer in (d0, d1):
        a.add_peer(peer.name, peer.metadata())
    handles = write_to_worker(a, "D", [1, 2], [5, 6])
    assert [h.peer for h in handles] == ["D", "D.r1"]
    assert sum(h.num_bytes for h in handles) == 2 * 2 * a.layout.block_bytes
    a.progress()
    assert torch.equal(d0.kv[:, 5:7], src[:, 1:3, :, :, 0:2])
    assert torch.equal(d1.kv[:, 5:7], src[:, 1:3, :, :, 2:4])
