"""Routing policies, on hand-made candidates."""
from __future__ import annotations

from pdserve.cluster.records import LoadReport, WorkerRecord
from pdserve.router.policies import Candidate, LeastLoaded, PrefixAware, RoundRobin, block_hashes, make_policy


def cand(worker_id: str, running: int = 0, waiting: int = 0, inflight: int = 0, free: int = 100) -> Candidate:
    record = WorkerRecord(id=worker_id, role="hybrid", grpc_address="x:1", metrics_url="", model="m", block_size=4)
    return Candidate(record, LoadReport(running=running, waiting=waiting, kv_blocks_free=free), inflight)


def test_round_robin_rotates() -> None:
    policy, cs = RoundRobin(), [cand("a"), cand("b"), cand("c")]
    assert [policy.choose(cs, []).record.id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_prefers_low_score_then_free_blocks() -> None:
    policy = LeastLoaded()
    assert policy.choose([cand("a", running=3), cand("b", running=1)], []).record.id == "b"
    assert policy.choose([cand("a", inflight=2), cand("b", running=1)], []).record.id == "b"
    assert policy.choose([cand("a", free=10), cand("b", free=50)], []).record.id == "b"


def test_least_loaded_spreads_ties() -> None:
    policy, cs = LeastLoaded(), [cand("a"), cand("b")]
    assert {policy.choose(cs, []).record.id for _ in range(4)} == {"a", "b"}


def test_block_hashes_chain_and_cover_full_blocks_only() -> None:
    assert block_hashes([1, 2, 3], 4, 8) == []
    a, b = block_hashes(list(range(10)), 4, 8), block_hashes(list(range(8)) + [99, 98], 4, 8)
    assert len(a) == 2 and a == b
    assert block_hashes([9] + list(range(1, 8)), 4, 8)[1] != a[1]  # a later block depends on earlier ones
    assert len(block_hashes(list(range(100)), 4, 3)) == 3


def test_prefix_aware_sticks_to_owner_unless_overloaded() -> None:
    policy = PrefixAware(prefix_blocks=4, overload_margin=2)
    prompt = list(range(16))
    first = policy.choose([cand("a"), cand("b")], prompt).record.id
    other = "b" if first == "a" else "a"
    for _ in range(3):
        assert policy.choose([cand("a"), cand("b")], prompt + [7, 7]).record.id == first
    busy = [cand(first, running=5), cand(other)]
    assert policy.choose(busy, prompt).record.id == other


def test_make_policy_names() -> None:
    assert isinstance(make_policy("prefix_aware"), PrefixAware)
    assert isinstance(make_policy("round_robin"), RoundRobin)


def test_adapter_affinity_prefers_workers_with_the_adapter_resident_unless_much_busier() -> None:
    from pdserve.router.policies import adapter_affinity

    def with_resident(c: Candidate, names: list[str]) -> Candidate:
        return Candidate(c.record, LoadReport(running=c.load.running, lora_resident=names), c.local_inflight)

    a, b = with_resident(cand("a", running=2), ["x"]), with_resident(cand("b"), [])
    assert [c.record.id for c in adapter_affinity([a, b], "x")] == ["a"]
    assert [c.record.id for c in adapter_affinity([a, b], None)] == ["a", "b"]
    assert [c.record.id for c in adapter_affinity([a, b], "y")] == ["a", "b"]  # resident nowhere
    busy = with_resident(cand("a", running=9), ["x"])
    assert [c.record.id for c in adapter_affinity([busy, b], "x")] == ["a", "b"]  # too busy: everyone
    assert LoadReport.from_json(LoadReport(lora_resident=["x"]).to_json()).lora_resident == ["x"]
