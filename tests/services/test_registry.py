"""Worker registration and router discovery against a real etcd (child process)."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import pytest

from pdserve.cluster.discovery import Discovery
from pdserve.cluster.etcd import connect, parse_endpoints, retry_until_reachable
from pdserve.cluster.keys import KeySpace
from pdserve.cluster.records import LoadReport, WorkerRecord
from pdserve.cluster.registry import Registration
from pdserve.launcher.etcd_server import start_etcd
from pdserve.launcher.processes import ProcessGroup


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Any:
    group = ProcessGroup()
    server = start_etcd(group, str(tmp_path_factory.mktemp("etcd-logs")))
    try:
        yield server, group
    finally:
        server.stop()
        group.stop_all(2.0)


def record(worker_id: str, role: str = "hybrid") -> WorkerRecord:
    return WorkerRecord(id=worker_id, role=role, grpc_address="127.0.0.1:1", metrics_url="http://x/metrics",
                        model="m", kv_layout={"num_layers": 2}, capacity={"kv_blocks_total": 10})


async def until(predicate: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def test_parse_endpoints() -> None:
    assert parse_endpoints("http://a:1, b:2") == ["a:1", "b:2"]
    with pytest.raises(ValueError):
        parse_endpoints("https://a")


def test_register_discover_load_and_revoke(etcd: Any) -> None:
    server, _ = etcd

    async def body() -> None:
        keys = KeySpace("t1")
        worker_client, router_client = await connect(server.url), await connect(server.url)
        discovery = Discovery(router_client, keys)
        await discovery.start()
        load = {"running": 0}
        reg = Registration(worker_client, keys, record("w1", "decode"), lambda: LoadReport(**load), ttl=3,
                           load_interval=0.1)
        await reg.start()
        assert await until(lambda: [r.id for r in discovery.live("decode")] == ["w1"], 1.0) < 1.0
        assert discovery.live("decode")[0].kv_layout == {"num_layers": 2}
        load["running"] = 4
        await until(lambda: discovery.load("w1").running == 4, 2.0)
        await reg.stop()
        await until(lambda: not discovery.live(), 1.0)
        assert "w1" not in discovery.loads
        await discovery.stop()
        await worker_client.close()
        await router_client.close()

    asyncio.run(body())


def test_dead_worker_disappears_when_lease_expires(etcd: Any) -> None:
    server, _ = etcd

    async def body() -> None:
        keys = KeySpace("t2")
        worker_client, router_client = await connect(server.url), await connect(server.url)
        discovery = Discovery(router_client, keys)
        await discovery.start()
        reg = Registration(worker_client, keys, record("w2"), LoadReport, ttl=2, load_interval=0.1)
        await reg.start()
        await until(lambda: bool(discovery.live()), 1.0)
        await worker_client.close()  # the process "dies": no keep-alive, no revoke
        reg._task.cancel()
        assert await until(lambda: not discovery.live(), 6.0) < 4.5
        await discovery.stop()
        await router_client.close()

    asyncio.run(body())


def test_discovery_keeps_last_known_set_while_etcd_is_down(etcd: Any, tmp_path: Any) -> None:
    server, group = etcd

    async def body() -> None:
        keys = KeySpace("t3")
        worker_client, router_client = await connect(server.url), await connect(server.url)
        discovery = Discovery(router_client, keys)
        await discovery.start()
        reg = Registration(worker_client, keys, record("w3"), LoadReport, ttl=5, load_interval=0.2)
        await reg.start()
        await until(lambda: bool(discovery.live()), 1.0)
        ports, data_dir = server.ports, server.data_dir
        await asyncio.to_thread(server.stop, True)
        await asyncio.sleep(1.5)
        assert [r.id for r in discovery.live()] == ["w3"]  # still served from memory
        restarted = await asyncio.to_thread(start_etcd, group, str(tmp_path), 20.0, ports, data_dir)
        server.child = restarted.child
        reg2 = Registration(worker_client, keys, record("w4"), LoadReport, ttl=5, load_interval=0.2)
        # as the worker process does: the client's channel may still be backing off after the restart
        await retry_until_reachable(reg2.start, 20.0, "restarted etcd")
        await until(lambda: {r.id for r in discovery.live()} == {"w3", "w4"}, 10.0)
        for r in (reg, reg2):
            await r.stop()
        await until(lambda: not discovery.live(), 5.0)
        await discovery.stop()
        await worker_client.close()
        await router_client.close()

    asyncio.run(body())


def test_discovery_follows_an_etcd_that_lost_its_data(etcd: Any, tmp_path: Any) -> None:
    """Restarted with an empty data dir (the chart's default emptyDir): revisions start again at 1."""
    server, group = etcd

    async def body() -> None:
        keys = KeySpace("t4")
        worker_client, router_client = await connect(server.url), await connect(server.url)
        discovery = Discovery(router_client, keys, probe_interval=0.2, grace=3.0)
        await discovery.start()
        old = Registration(worker_client, keys, record("w5"), LoadReport, ttl=5, load_interval=0.05)
        await old.start()
        await until(lambda: bool(discovery.live()), 1.0)
        await asyncio.sleep(1.0)  # ~20 load reports: the old etcd's revision runs ahead of the new one's
        ports = server.ports
        await asyncio.to_thread(server.stop, False)  # data dir removed
        await old.stop()  # its lease died with the data
        restarted = await asyncio.to_thread(start_etcd, group, str(tmp_path), 20.0, ports)
        server.child, server.data_dir = restarted.child, restarted.data_dir
        new = Registration(worker_client, keys, record("w6"), LoadReport, ttl=5, load_interval=1.0)
        await retry_until_reachable(new.start, 20.0, "restarted etcd")
        await until(lambda: "w6" in {r.id for r in discovery.live()}, 5.0)
        assert "w5" in {r.id for r in discovery.live()}  # kept while it may still register again
        took = await until(lambda: [r.id for r in discovery.live()] == ["w6"], 10.0)
        assert took < 5.0  # dropped once the grace is over
        await new.stop()
        await until(lambda: not discovery.live(), 5.0)
        await discovery.stop()
        await worker_client.close()
        await router_client.close()

    asyncio.run(body())
