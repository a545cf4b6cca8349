"""Worker lifecycle seen through the router (fake engine, real etcd): drain, sudden
death, no workers at all, and the routing policies. Each test owns its cluster."""
from __future__ import annotations

import threading
import time
from typing import Iterator

import grpc
import pytest
from pdserve.v1 import common_pb2, router_pb2

from tests.services.clients import generate, http_json, live_workers, router_stub, wait_for
from tests.services.inproc import InProcessCluster


@pytest.fixture
def make_cluster() -> Iterator:
    made: list[InProcessCluster] = []

    def make(num_workers: int = 2, policy: str = "least_loaded") -> InProcessCluster:
        c = InProcessCluster(policy=policy)
        made.append(c)
        c.start(num_workers)
        wait_for(lambda: len(live_workers(c.http_url)) == num_workers, 10.0, what="workers registered")
        return c

    yield make
    for c in made:
        c.stop()


def ids_of(address: str, n: int, prompt: list[int], max_tokens: int = 2) -> list[str]:
    stub = router_stub(address)
    return [generate(stub, stream=False, token_ids=router_pb2.TokenIds(ids=prompt),
                     params={"max_tokens": max_tokens})[0].worker_id for _ in range(n)]


def test_drain_finishes_inflight_and_routes_elsewhere(make_cluster) -> None:
    c = make_cluster(2)
    request = router_pb2.GenerateRequest(stream=True, token_ids=router_pb2.TokenIds(ids=[100]),
                                         params=common_pb2.SamplingParams(max_tokens=200))
    call = router_stub(c.grpc_address).Generate(request, timeout=30)
    first = next(call)
    draining = next(w for w in c.workers if w.config.worker_id == first.worker_id)
    drained = threading.Thread(target=c.call, args=(draining.drain(),))
    drained.start()
    wait_for(lambda: draining.inflight.draining, 2.0, what="drain started")
    wait_for(lambda: len(live_workers(c.http_url)) == 1, 2.0, what="drained worker deregistered")
    others = ids_of(c.grpc_address, 3, [7])
    assert draining.config.worker_id not in others
    rest = list(call)
    assert rest[-1].finish_reason == "length"
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 200
    drained.join(10.0)
    assert not drained.is_alive() and not draining.engine.started


def test_drain_deadline_aborts_leftovers(make_cluster) -> None:
    c = make_cluster(1)
    worker = c.workers[0]
    worker.config = type(worker.config)(**{**worker.config.__dict__, "drain_timeout": 0.3})
    request = router_pb2.GenerateRequest(stream=True, token_ids=router_pb2.TokenIds(ids=[100]),
                                         params=common_pb2.SamplingParams(max_tokens=1500))
    call = router_stub(c.grpc_address).Generate(request, timeout=30)
    next(call)
    c.call(worker.drain())
    assert list(call)[-1].finish_reason == "abort"
    assert not worker.engine.blocks


def test_dead_worker_is_skipped_then_forgotten(make_cluster) -> None:
    c = make_cluster(2)
    victim = c.workers[0]

    async def die() -> None:  # like SIGKILL: no deregistration, connections drop
        victim.registration._task.cancel()
        victim.registration._lease_id = None
        await victim.server.stop(None)
        await victim._etcd.close()

    c.call(die())
    start = time.monotonic()
    served = ids_of(c.grpc_address, 6, [9])
    assert set(served) == {c.workers[1].config.worker_id}
    wait_for(lambda: len(live_workers(c.http_url)) == 1, 5.0, what="dead worker dropped")
    assert time.monotonic() - start < 5.0  # lease TTL is 2 s here


def test_no_workers_is_503_and_unavailable(make_cluster) -> None:
    c = make_cluster(0)
    status, body = http_json(f"{c.http_url}/v1/completions", {"model": "smollm2", "prompt": "x"})
    assert status == 503 and "no live workers" in body["error"]["message"]
    with pytest.raises(grpc.RpcError) as info:
        generate(router_stub(c.grpc_address), text="x")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert http_json(f"{c.http_url}/health") == (200, {"status": "ok", "workers": 0})


def test_round_robin_alternates(make_cluster) -> None:
    c = make_cluster(2, policy="round_robin")
    served = ids_of(c.grpc_address, 4, [5])
    assert served[0] != served[1] and served[:2] == served[2:]


def test_prefix_aware_keeps_a_prefix_on_one_worker(make_cluster) -> None:
    c = make_cluster(2, policy="prefix_aware")
    prompt = list(range(100, 164))  # 4 full blocks of 16
    assert len(set(ids_of(c.grpc_address, 4, prompt))) == 1
    time.sleep(0.5)  # let both load reports (0.2 s period) show idle workers again
    spread = {ids_of(c.grpc_address, 1, [300 + i] * 40)[0] for i in range(8)}
    assert len(spread) == 2  # different prefixes still use both workers
