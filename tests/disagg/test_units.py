"""Fast, in-process pieces of disaggregation: P/D routing, the KV handshake as the router
sees it, the worker's KV peers over the fake transfer agent, configs and topology."""
from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
import torch

from pdserve.cluster.kv_peers import KVPeers, PeerIncompatible, PeerUnavailable
from pdserve.engine.kv_connector import KVTransfers, ProgressConfig, encode_done
from pdserve.cluster.records import LoadReport, WorkerRecord, kv_mismatch
from pdserve.engine.kv_transfer.fake import FakeKVRegistry, FakeKVTransferAgent
from pdserve.launcher.cli import topology
from pdserve.router.policies import MostFreeKV, PrefixAware, RoundRobin
from pdserve.router.worker_pool import RoutingConfig, WorkerPool
from pdserve.worker.config import build_worker_config, resolve_kv_send

HANDSHAKE = {"protocol_version": 1, "model": "m", "dtype": "float32", "block_size": 16,
             "kv_layout": "layer,block,kv,token,head,dim", "num_layers": 2, "num_kv_heads": 1, "head_dim": 8}


def record(worker_id: str, role: str, metadata: str = "bWV0YQ==", **handshake: Any) -> WorkerRecord:
    return WorkerRecord(id=worker_id, role=role, grpc_address=f"127.0.0.1:{len(worker_id)}", metrics_url="", model="m",
                        kv_agent=worker_id, kv_handshake={**HANDSHAKE, **handshake}, kv_metadata=metadata)


class FakeDiscovery:
    def __init__(self, *records: WorkerRecord, loads: dict[str, LoadReport] | None = None) -> None:
        self.records = {r.id: r for r in records}
        self.loads = loads or {}
        self.listeners: list = []

    def add_listener(self, callback: Any) -> None:
        self.listeners.append(callback)

    def live(self, role: str | None = None) -> list[WorkerRecord]:
        return sorted((r for r in self.records.values() if role is None or r.role == role), key=lambda r: r.id)

    def load(self, worker_id: str) -> LoadReport:
        return self.loads.get(worker_id) or LoadReport(timestamp=0.0)

    def set(self, *records: WorkerRecord) -> None:
        self.records = {r.id: r for r in records}
        for callback in self.listeners:
            callback()


def route(discovery: FakeDiscovery, tokens: list[int], threshold: int = 8) -> Any:
    """``WorkerPool.pick_route`` on an event loop (worker channels are grpc.aio)."""
    async def pick() -> Any:
        policies = {"hybrid": RoundRobin(), "decode": MostFreeKV(), "prefill": PrefixAware()}
        workers = WorkerPool(discovery, policies, routing=RoutingConfig(threshold, 2))
        try:
            return workers.pick_route(tokens, "m")
        finally:
            await workers.close()
    return asyncio.run(pick())


# ---- routing ---------------------------------------------------------------------------

def test_route_prefers_decode_workers_with_most_free_kv_and_names_prefill_workers() -> None:
    loads = {"d1": LoadReport(kv_blocks_free=10), "d2": LoadReport(kv_blocks_free=50),
             "p1": LoadReport(running=3), "p2": LoadReport(running=0)}
    d = FakeDiscovery(record("d1", "decode"), record("d2", "decode"), record("p1", "prefill"), record("p2", "prefill"),
                      record("h1", "hybrid"), loads=loads)
    chosen = route(d, list(range(40)))
    assert chosen.decode.record.id == "d2" and chosen.local_reason == ""
    assert {r.id for r in chosen.prefill} == {"h1", "p2"}  # the two least loaded (no prefix owner yet)


def test_route_local_reasons() -> None:
    tokens = list(range(40))
    assert route(FakeDiscovery(record("d", "decode"), record("p", "prefill")), tokens[:5]).local_reason \
        == "short"
    assert route(FakeDiscovery(record("d", "decode")), tokens).local_reason == "no_prefill_worker"
    odd = FakeDiscovery(record("d", "decode", block_size=32), record("p", "prefill"))
    assert route(odd, tokens).local_reason == "incompatible"
    # two hybrid workers stay aggregated: hybrid decode workers only pair with dedicated prefill workers
    hybrids = route(FakeDiscovery(record("h1", "hybrid"), record("h2", "hybrid")), tokens)
    assert hybrids.prefill == [] and hybrids.local_reason == "no_prefill_worker"
    assert route(FakeDiscovery(record("p", "prefill")), tokens) is None


def test_kv_mismatch_names_fields_and_both_values() -> None:
    assert kv_mismatch(record("a", "decode"), record("b", "prefill")) is None
    msg = kv_mismatch(record("a", "decode", block_size=32, dtype="bfloat16"), record("b", "prefill"))
    assert msg == "a and b cannot exchange KV: dtype: 'bfloat16' != 'float32'; block_size: 32 != 16"
    assert "publish no KV transfer agent" in kv_mismatch(record("a", "decode", metadata=""), record("b", "prefill"))


# ---- KV peers over the fake agent ---------------------------------------------------------

def _agent(name: str, registry: FakeKVRegistry, block_size: int = 16) -> FakeKVTransferAgent:
    return FakeKVTransferAgent(name, torch.zeros(2, 4, 2, block_size, 1, 8), "m", registry)


def _published(agent: FakeKVTransferAgent, role: str) -> WorkerRecord:
    return WorkerRecord(id=agent.name, role=role, grpc_address="", metrics_url="", model="m", kv_agent=agent.name,
                        kv_handshake=agent.layout.handshake("m"),
                        kv_metadata=base64.b64encode(agent.metadata()).decode())


def test_kv_peers_follow_discovery_refuse_incompatible_and_transfers_deliver_notifications() -> None:
    async def body() -> None:
        registry = FakeKVRegistry()
        decode, prefill, odd = _agent("d", registry), _agent("p", registry), _agent("o", registry, block_size=32)
        other_decode = _agent("d2", registry)
        discovery = FakeDiscovery(_published(decode, "decode"), _published(prefill, "prefill"),
                                  _published(odd, "decode"), _published(other_decode, "decode"))
        peers = KVPeers(prefill, "p", "prefill")
        peers.start(discovery)
        assert prefill.peers() == {"d", "d2"}  # never itself, never the incompatible one
        assert "block_size: local 16 != remote 32" in peers.errors["o"]
        with pytest.raises(PeerIncompatible):
            await peers.wait_peer("o", 0.05)
        with pytest.raises(PeerUnavailable):
            await peers.wait_peer("nobody", 0.05)
        d_peers = KVPeers(decode, "d", "decode")
        d_peers.start(FakeDiscovery(_published(prefill, "prefill"), _published(other_decode, "decode")))
        assert decode.peers() == {"p"}  # decode workers do not pair with each other
        d_transfers = KVTransfers(decode, ProgressConfig(busy_poll=0.001, idle_poll=0.01))
        await d_transfers.start()
        landed = d_transfers.expect("r1", "p")
        prefill.send_notify("d", encode_done("r1", 42))
        assert await asyncio.wait_for(landed, 2.0) == 42
        # only the agent the order went to may say the KV landed
        landed = d_transfers.expect("r2", "p")
        other_decode.add_peer("d", decode.metadata())  # an agent that knows d, but is not the one ordered
        other_decode.send_notify("d", encode_done("r2", 7))
        await asyncio.sleep(0.05)
        assert not landed.done()
        prefill.send_notify("d", encode_done("r2", 9))
        assert await asyncio.wait_for(landed, 2.0) == 9
        # a restarted decode worker: same name, new metadata -> replaced; a gone one -> removed
        decode.close()
        restarted = _agent("d", registry)
        discovery.set(_published(restarted, "decode"), _published(prefill, "prefill"))
        assert prefill.peers() == {"d"} and peers.is_gone("d", _published(decode, "decode").kv_metadata)
        h = prefill.write_blocks("d", [0], [1])
        await asyncio.sleep(0.05)
        assert prefill.poll(h).name == "DONE"
        waiting = d_transfers.expect("r3", "p")
        await d_transfers.close()  # fails what still waits, closes the agent
        assert isinstance(waiting.exception(), Exception)
        prefill.close()
    asyncio.run(body())


# ---- configuration ----------------------------------------------------------------------

def test_worker_config_disaggregation_flags() -> None:
    flags = {"etcd": "http://e:1", "kv_send": "whole", "local_prefill_threshold": "64", "debug_rpcs": "true",
             "remote_prefill_timeout": "5"}
    config = build_worker_config(flags, {"PDSERVE_KV_TRANSFER": "false"})
    assert (config.kv_send, config.local_prefill_threshold, config.debug_rpcs, config.kv_transfer,
            config.remote_prefill_timeout) == ("whole", 64, True, False, 5.0)
    with pytest.raises(ValueError, match="kv_send"):
        build_worker_config({"etcd": "http://e:1", "kv_send": "sometimes"}, {})
    with pytest.raises(ValueError, match="debug_rpcs"):
        build_worker_config({"etcd": "http://e:1", "debug_rpcs": "maybe"}, {})


def test_kv_send_auto_is_whole_on_cpu_and_layerwise_on_accelerators() -> None:
    assert build_worker_config({"etcd": "http://e:1"}, {}).kv_send == "auto"
    assert resolve_kv_send("auto", "cpu") == "whole"
    assert resolve_kv_send("auto", "cuda") == "layerwise"
    assert resolve_kv_send("layerwise", "cpu") == "layerwise" and resolve_kv_send("whole", "cuda") == "whole"


@pytest.mark.parametrize("given, expected", [
    ((None, None, None), (0, 1, 1)), ((2, None, None), (2, 0, 0)), ((None, 2, 3), (0, 2, 3)), ((1, 1, None), (1, 1, 0)),
])
def test_pdserve_up_topology(given: tuple, expected: tuple) -> None:
    assert topology(*given) == expected


def test_a_worker_registered_again_gets_a_fresh_channel_and_is_not_suspect(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart on the same address: no inherited reconnect backoff, no suspect mark."""
    import pdserve.router.worker_pool as worker_pool

    opened: list[str] = []
    real_open = worker_pool.open_channel
    monkeypatch.setattr(worker_pool, "open_channel", lambda address, *a, **k: opened.append(address) or
                        real_open(address, *a, **k))

    async def body() -> None:
        first, other = record("d1", "decode", metadata="djE="), record("d22", "decode")
        discovery = FakeDiscovery(first, other)
        pool = WorkerPool(discovery, {"decode": MostFreeKV()}, suspect_seconds=60.0)
        pool.stub(first)
        pool.mark_suspect("d1")
        assert [c.record.id for c in pool.candidates("decode", "m")] == ["d22"]
        discovery.set(first, other)  # the same records again: nothing changes
        pool.stub(first)
        assert len(opened) == 1 and [c.record.id for c in pool.candidates("decode", "m")] == ["d22"]
        restarted = record("d1", "decode", metadata="djI=")
        discovery.set(restarted, other)
        assert [c.record.id for c in pool.candidates("decode", "m")] == ["d1", "d22"]
        pool.stub(restarted)
        assert opened == [first.grpc_address, restarted.grpc_address]  # a new channel to the same address
        await pool.close()
    asyncio.run(body())


def test_a_loopback_worker_keeps_ucx_on_loopback() -> None:
    from pdserve.worker.process import confine_kv_listener

    env: dict[str, str] = {}
    confine_kv_listener("127.0.0.1", env)
    assert env == {"UCX_NET_DEVICES": "lo"}
    for host, given in (("0.0.0.0", {}), ("10.1.2.3", {}), ("localhost", {}),
                        ("127.0.0.1", {"UCX_NET_DEVICES": "eth1"})):
        env = dict(given)
        confine_kv_listener(host, env)
        assert env == given
