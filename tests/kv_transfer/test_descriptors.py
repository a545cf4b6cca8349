"""Block-id merging, descriptor arithmetic, the layout and the handshake envelope."""
from __future__ import annotations

import numpy as np
import pytest

from pdserve.engine.kv_transfer.base import (
    PROTOCOL_VERSION,
    KVCompatibilityError,
    KVLayout,
    PeerInfo,
    check_compatible,
)
from pdserve.engine.kv_transfer.descriptors import (
    BlockRun,
    KVRegion,
    all_block_descriptors,
    check_block_ids,
    merge_block_runs,
    run_descriptors,
    run_indices,
)

LAYOUT = KVLayout(num_layers=3, num_blocks=10, block_size=16, num_kv_heads=2, head_dim=8, dtype="float16")


def region(base: int = 1 << 20, num_blocks: int = 10, block_bytes: int = 100, device_id: int = 0) -> KVRegion:
    return KVRegion(base, num_blocks, block_bytes, device_id)


# ---- merge_block_runs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "remote", "runs"),
    [
        ([], [], []),
        ([4], [7], [(4, 7, 1)]),
        ([0, 1, 2, 3], [5, 6, 7, 8], [(0, 5, 4)]),
        # split where only the remote side breaks ...
        ([0, 1, 2, 3], [5, 6, 9, 10], [(0, 5, 2), (2, 9, 2)]),
        # ... and where only the local side breaks
        ([0, 1, 5, 6], [3, 4, 5, 6], [(0, 3, 2), (5, 5, 2)]),
        # descending ids never merge
        ([3, 2, 1], [3, 2, 1], [(3, 3, 1), (2, 2, 1), (1, 1, 1)]),
        # a repeated local block (one source, two destinations) is allowed
        ([2, 2], [0, 1], [(2, 0, 1), (2, 1, 1)]),
        ([1, 2, 3, 7, 8, 9, 10], [5, 6, 9, 10, 11, 12, 20], [(1, 5, 2), (3, 9, 1), (7, 10, 3), (10, 20, 1)]),
    ],
)
def test_merge_block_runs(local: list[int], remote: list[int], runs: list[tuple[int, int, int]]) -> None:
    assert merge_block_runs(local, remote) == tuple(BlockRun(*r) for r in runs)


def test_merge_accepts_numpy_and_tuples() -> None:
    assert merge_block_runs(np.array([1, 2]), (4, 5)) == (BlockRun(1, 4, 2),)


def test_runs_cover_every_pair_in_order() -> None:
    rng = np.random.default_rng(0)
    local = rng.permutation(200)[:120]
    remote = np.sort(rng.permutation(300)[:120])
    local.sort()
    runs = merge_block_runs(local, remote)
    pairs = [(r.local_start + i, r.remote_start + i) for r in runs for i in range(r.length)]
    assert pairs == list(zip(local.tolist(), remote.tolist()))
    assert all(r.length >= 1 for r in runs)


@pytest.mark.parametrize(
    ("local", "remote", "message"),
    [
        ([1, 2], [1], "differ in length: local 2 != remote 1"),
        ([], [3], "differ in length: local 0 != remote 1"),
        ([-1], [0], "local block id -1 is negative"),
        ([0], [-2], "remote block id -2 is negative"),
        ([0, 1], [4, 4], "remote block ids repeat: 4"),
        ([0.5], [1], "flat list of integers"),
        ([[1, 2]], [[3, 4]], "flat list of integers"),
    ],
)
def test_merge_rejects_bad_input(local: list, remote: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        merge_block_runs(local, remote)


def test_check_block_ids_against_each_side() -> None:
    runs = merge_block_runs([8, 9], [2, 3])
    check_block_ids(runs, 10, "local")
    check_block_ids(runs, 4, "remote")
    with pytest.raises(ValueError, match="local block id 9 out of range: the local cache has 9 blocks"):
        check_block_ids(runs, 9, "local")
    with pytest.raises(ValueError, match="remote block id 3 out of range"):
        check_block_ids(runs, 3, "remote")


# ---- descriptors and indices ---------------------------------------------------


def test_run_descriptors_one_row_per_run_per_layer() -> None:
    runs = merge_block_runs([0, 1, 2, 7], [4, 5, 6, 0])
    reg = region(base=1000, num_blocks=10, block_bytes=100, device_id=3)
    local = run_descriptors(runs, reg, range(1, 3), "local")
    remote = run_descriptors(runs, reg, range(1, 3), "remote")
    assert local.dtype == np.uint64
    assert local.tolist() == [[1000 + 1000, 300, 3], [1000 + 1700, 100, 3],
                              [1000 + 2000, 300, 3], [1000 + 2700, 100, 3]]
    assert remote.tolist() == [[1000 + 1400, 300, 3], [1000 + 1000, 100, 3],
                               [1000 + 2400, 300, 3], [1000 + 2000, 100, 3]]
    assert (local[:, 1] == remote[:, 1]).all()  # every local run maps onto an equal remote run


def test_run_descriptors_empty() -> None:
    assert run_descriptors((), region(), range(3), "local").shape == (0, 3)
    assert run_descriptors(merge_block_runs([1], [1]), region(), range(0), "local").shape == (0, 3)
    assert run_indices((), 10, range(3), "local").size == 0


def test_indices_address_the_same_bytes_as_merged_descriptors() -> None:
    rng = np.random.default_rng(1)
    local, remote = np.sort(rng.permutation(40)[:25]), np.sort(rng.permutation(60)[:25])
    runs = merge_block_runs(local, remote)
    for side, reg in (("local", region(num_blocks=40)), ("remote", region(base=7 << 30, num_blocks=60))):
        table = all_block_descriptors(reg, num_layers=4)
        assert table.shape == (4 * reg.num_blocks, 3)
        picked = table[run_indices(runs, reg.num_blocks, range(4), side)]
        merged = run_descriptors(runs, reg, range(4), side)
        covered = {int(a) + off for a, n, _ in merged for off in range(0, int(n), reg.block_bytes)}
        assert sorted(covered) == sorted(int(a) for a in picked[:, 0])
        assert run_indices(runs, reg.num_blocks, range(4), side).dtype == np.int32


# ---- layout, handshake, envelope --------------------------------------------------


def test_layout_sizes() -> None:
    assert LAYOUT.shape == (3, 10, 2, 16, 2, 8)
    assert LAYOUT.block_bytes == 2 * 16 * 2 * 8 * 2
    assert LAYOUT.layer_stride_bytes == 10 * LAYOUT.block_bytes
    assert LAYOUT.total_bytes == 3 * LAYOUT.layer_stride_bytes


def test_layout_for_tensor() -> None:
    torch = pytest.importorskip("torch")
    kv = torch.empty(LAYOUT.shape, dtype=torch.float16)
    assert KVLayout.for_tensor(kv) == LAYOUT
    assert LAYOUT.block_bytes == kv[0, 0].numel() * kv.element_size()
    with pytest.raises(ValueError, match="is not"):
        KVLayout.for_tensor(torch.empty(3, 10, 16))


@pytest.mark.parametrize(("field", "value"), [("num_layers", 0), ("block_size", -16), ("dtype", "int8"),
                                              ("device", "tpu"), ("head_dim", True)])
def test_layout_validation_names_the_field(field: str, value: object) -> None:
    fields = {"num_layers": 1, "num_blocks": 1, "block_size": 16, "num_kv_heads": 1, "head_dim": 8,
              "dtype": "float32", "device": "cpu", field: value}
    with pytest.raises(ValueError, match=f"KVLayout.{field}="):
        KVLayout(**fields)


def test_handshake_ignores_num_blocks_and_device() -> None:
    bigger = KVLayout(3, 999, 16, 2, 8, "float16", device="cuda:1")
    assert bigger.handshake("m") == LAYOUT.handshake("m")
    assert bigger.compat_key("m") == LAYOUT.compat_key("m")
    assert LAYOUT.compat_key("m") != LAYOUT.compat_key("other-model")
    assert LAYOUT.handshake("m")["protocol_version"] == PROTOCOL_VERSION


def test_check_compatible_names_every_differing_field() -> None:
    local = LAYOUT.handshake("smollm2")
    remote = KVLayout(3, 10, 32, 2, 8, "bfloat16").handshake("llama")
    with pytest.raises(KVCompatibilityError) as err:
        check_compatible(local, remote)
    message = str(err.value)
    assert "block_size: local 16 != remote 32" in message
    assert "dtype: local 'float16' != remote 'bfloat16'" in message
    assert "model: local 'smollm2' != remote 'llama'" in message
    check_compatible(local, dict(local))


def test_peer_info_round_trip_and_rejections() -> None:
    info = PeerInfo("worker-7", LAYOUT.handshake("m"), 10, LAYOUT.block_bytes, "DRAM", 0, 1234, b"\x00nixl\xff")
    assert PeerInfo.decode(info.encode()) == info
    with pytest.raises(KVCompatibilityError, match="magic"):
        PeerInfo.decode(b"XXXX" + info.encode()[4:])
    with pytest.raises(KVCompatibilityError, match="too short"):
        PeerInfo.decode(b"PD")
    future = bytearray(info.encode())
    future[4:6] = (PROTOCOL_VERSION + 1).to_bytes(2, "big")
    with pytest.raises(KVCompatibilityError, match=f"protocol_version: local {PROTOCOL_VERSION} != remote"):
        PeerInfo.decode(bytes(future))


def test_a_prompt_allocated_on_both_sides_moves_as_one_run() -> None:
    """The pools hand out contiguous runs, so a prompt's KV is one region per layer on
    each side even after other requests came and went (holes in both pools)."""
    from pdserve.engine.kv_cache import KVCacheManager

    import random

    rng = random.Random(0)
    prefill, decode = KVCacheManager(256, 16), KVCacheManager(256, 16)
    for kv in (prefill, decode):
        count = 0
        while kv.stats()["free"] > 20:  # the whole pool has been used once
            n = rng.randrange(17, 300)
            kv.match_prefix(f"h{count}", list(range(n)))
            if not kv.allocate_slots(f"h{count}", n):
                kv.free(f"h{count}")
                break
            count += 1
        order = list(range(count))
        rng.shuffle(order)
        for i in order[1:]:  # one stays: a hole somewhere in the pool
            kv.free(f"h{i}")
    prompt = list(range(1000, 1000 + 1500))
    decode.match_prefix("r", prompt)
    assert decode.allocate_slots("r", len(prompt))
    prefill.match_prefix("r", prompt)
    for chunk_end in range(512, len(prompt) + 512, 512):  # chunked prefill grows the table
        assert prefill.allocate_slots("r", min(chunk_end, len(prompt)))
    runs = merge_block_runs(prefill.blocks_of("r"), decode.blocks_of("r"))
    assert len(runs) == 1 and runs[0].length == -(-len(prompt) // 16)
