"""Disaggregated prefill/decode end to end: real etcd, real NIXL (UCX over loopback), real
worker processes (smollm2, CPU, float32), one module-scoped cluster of 2 prefill + 1 decode.

Order matters: the tests go from a healthy 2P1D cluster to faults. After the prefill
SIGKILL the cluster is 1P1D; later tests restart workers under their old ids (so
peers must replace stale NIXL metadata) and finally add an incompatible decode worker.
"""
from __future__ import annotations

import http.client
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pdserve.v1 import common_pb2, router_pb2, worker_pb2

from pdserve.cluster.orders import OrderBook
from pdserve.launcher.cluster import LocalCluster
from tests.disagg.helpers import (BLOCK_BYTES, BLOCK_SIZE, GREEDY, LAYERS, Reference, corpus_ids, cpu_seconds, debug,
                                  kv_totals, metric, metrics, prompt, router_generate, stats, tokens_of, wait_quiet,
                                  worker_generate, workers)
from tests.services.clients import router_stub, wait_for, worker_stub
from tests.services.cluster_fixture import kill_hard, local_cluster, worker_for

THRESHOLD = 8
PD_ARGS = ("--local-prefill-threshold", str(THRESHOLD), "--debug-rpcs", "true", "--remote-prefill-timeout", "60",
           "--kv-send", "layerwise")  # NOTE: the GPU default; CPU workers send whole prompts unless told
MAX_TOKENS = 12
LONG = 900  # tokens: ~1 s of prefill compute on CPU, room to act mid-request

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def reference() -> Iterator[Reference]:
    from pdserve.engine import LLM

    yield Reference(LLM(model="smollm2", num_blocks=256))


@pytest.fixture(scope="module")
def ids(reference: Reference) -> list[int]:
    return corpus_ids(reference.llm.tokenizer)


@pytest.fixture(scope="module")
def memo() -> dict:
    """State handed from one test to a later one (the module's tests run in order)."""
    return {}


@pytest.fixture(scope="module")
def cluster(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with local_cluster(hybrid=0, prefill=2, decode=1, worker_args=PD_ARGS, drain_timeout=5.0,
                       router_args=("--local-prefill-threshold", str(THRESHOLD)),
                       log_dir=str(tmp_path_factory.mktemp("pd-logs"))) as c:
        wait_for(lambda: all(stats(w).kv_peers >= 1 for w in workers(c)), 30.0, what="KV peers loaded")
        yield c


def expect_match(reference: Reference, prompts: list[list[int]], outputs: list[list[int]], max_tokens: int) -> None:
    for p, got, want in zip(prompts, outputs, reference.tokens(prompts, max_tokens)):
        assert got == want, f"prompt of {len(p)} tokens: {got} != offline {want}"


def test_outputs_match_offline_and_local_and_bytes_match_layout(cluster: LocalCluster, reference: Reference,
                                                                ids: list[int]) -> None:
    decode = workers(cluster, "decode")[0]
    lengths = [5, 12, 16, 17, 40, 300, 300]  # the repeat finds 18 blocks cached on the decode worker
    prompts = [prompt(ids, n, offset=7 * i) for i, n in enumerate(lengths[:-1])] + [prompt(ids, 300, offset=35)]
    reference.tokens(prompts, MAX_TOKENS)  # one offline batch
    for p in prompts:
        before = kv_totals(cluster)
        responses = router_generate(cluster, p, MAX_TOKENS)
        after = kv_totals(cluster)
        expect_match(reference, [p], [tokens_of(responses)], MAX_TOKENS)
        first = next(r for r in responses if r.token_ids)
        cached = responses[-1].usage.cached_tokens
        if len(p) < THRESHOLD:
            assert first.prefill_worker_id == "" and after == before, "a short prompt prefills on the decode worker"
            continue
        assert first.prefill_worker_id.startswith("prefill-") and first.worker_id == decode["id"]
        blocks = math.ceil(len(p) / BLOCK_SIZE) - cached // BLOCK_SIZE
        want = {"sent_blocks": blocks, "received_blocks": blocks, "sent_bytes": blocks * LAYERS * BLOCK_BYTES,
                "received_bytes": blocks * LAYERS * BLOCK_BYTES}
        assert {k: after[k] - before[k] for k in want} == want, (len(p), cached)
    assert responses[-1].usage.cached_tokens == 288  # the repeat: only the last, partial block travelled
    local = worker_generate(decode["grpc_address"], prompts[5], MAX_TOKENS)  # no prefill named: hybrid path
    assert tokens_of(local) == reference.tokens([prompts[5]], MAX_TOKENS)[0] and local[0].prefill_worker_id == ""
    m = metrics(decode)
    assert metric(m, "pdserve_worker_prefills_total", where="local", reason="short") == 1
    assert metric(m, "pdserve_worker_prefills_total", where="remote") == len(prompts) - 1
    wait_quiet(cluster)


HANDSHAKE = {"protocol_version": 1, "model": "smollm2", "dtype": "float32", "block_size": 16,
             "kv_layout": "layer,block,kv,token,head,dim", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64}


def test_forged_kv_writes_are_refused_and_logged(cluster: LocalCluster, reference: Reference,
                                                  ids: list[int]) -> None:
    """Everything an order needs is readable from etcd; only the cluster secret makes one valid."""
    decode, prefill = workers(cluster, "decode")[0], workers(cluster, "prefill")[0]
    cached = prompt(ids, 200, offset=1700)  # its blocks stay prefix-cached on the decode worker
    want = tokens_of(router_generate(cluster, cached, MAX_TOKENS))
    expect_match(reference, [cached], [want], MAX_TOKENS)
    before = kv_totals(cluster)

    def forged(rid: str, secret: str | None, names: str = prefill["id"]) -> worker_pb2.RemotePrefillRequest:
        order = worker_pb2.RemotePrefillRequest(
            request_id=rid, prompt_token_ids=prompt(ids, 200, offset=40), decode_kv_agent=decode["kv_agent"],
            decode_kv_handshake=json.dumps(HANDSHAKE), block_ids=list(range(13)), num_cached_tokens=0,
            prefill_worker_id=names)
        if secret is not None:
            OrderBook(secret, "attacker").sign(order)
        return order

    stub = worker_stub(prefill["grpc_address"])
    # (A replayed order is refused too: tests/disagg/test_orders.py; here no real order is captured.)
    cases = {"not signed": forged("x1#p0", None), "signature does not match": forged("x2#p0", "guessed"),
             "names prefill worker": forged("x3#p0", cluster.secret, names="prefill-other")}
    for why, order in cases.items():
        answer = stub.RemotePrefill(order, timeout=30)
        assert answer.status == worker_pb2.RemotePrefillResponse.INVALID and why in answer.error, (why, answer)
    log = open(worker_for(cluster, prefill["id"]).log_path).read()
    assert log.count("refused a RemotePrefill order") >= len(cases)
    wait_quiet(cluster)
    assert kv_totals(cluster) == before
    assert tokens_of(router_generate(cluster, cached, MAX_TOKENS)) == want  # its cached blocks are intact


def test_worker_rpcs_need_the_cluster_token(cluster: LocalCluster) -> None:
    prefill = workers(cluster, "prefill")[0]
    for token in ("", "guessed"):
        with pytest.raises(grpc.RpcError) as info:
            worker_stub(prefill["grpc_address"], token=token).Stats(worker_pb2.StatsRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            worker_generate_with(prefill["grpc_address"], token)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stats(prefill).kv_peers >= 1  # with the token
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(prefill["grpc_address"]))
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING  # probes need no token


def worker_generate_with(address: str, token: str) -> list:
    request = worker_pb2.WorkerGenerateRequest(request_id="no-token", prompt_token_ids=[1, 2, 3],
                                               params=common_pb2.SamplingParams(max_tokens=2))
    return list(worker_stub(address, token=token).Generate(request, timeout=10))


def test_idle_workers_burn_no_cpu(cluster: LocalCluster) -> None:
    wait_quiet(cluster)
    procs = [worker_for(cluster, w["id"]) for w in workers(cluster)]
    before = [cpu_seconds(p.pid) for p in procs]
    time.sleep(2.0)
    used = [cpu_seconds(p.pid) - b for p, b in zip(procs, before)]
    assert max(used) < 0.2, f"idle CPU seconds over 2 s: {used}"


def run_concurrently(cluster: LocalCluster, prompts: list[list[int]], max_tokens: int) -> list[list[Any]]:
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(lambda p: router_generate(cluster, p, max_tokens), prompts))


def mixed_prompts(ids: list[int], count: int, seed: int) -> list[list[int]]:
    lengths = [9, 15, 16, 17, 33, 64, 100, 180, 250, 47, 90, 130]
    return [prompt(ids, lengths[(i + seed) % len(lengths)], offset=(i * 53 + seed * 11) % 1500) for i in range(count)]


def test_concurrent_load_2p1d(cluster: LocalCluster, reference: Reference, ids: list[int]) -> None:
    prompts = mixed_prompts(ids, 32, seed=1)
    results = run_concurrently(cluster, prompts, 8)
    expect_match(reference, prompts, [tokens_of(r) for r in results], 8)
    used = {next(r for r in res if r.token_ids).prefill_worker_id for res in results}
    assert len(used - {""}) == 2, f"both prefill workers should serve: {used}"
    wait_quiet(cluster)


def _stream(cluster: LocalCluster, ids: list[int], max_tokens: int) -> Any:
    request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=ids), stream=True,
                                         params=common_pb2.SamplingParams(max_tokens=max_tokens, **GREEDY))
    return router_stub(cluster.grpc_address).Generate(request, timeout=120)


def _aborted(cluster: LocalCluster, phase: str) -> float:
    return sum(metric(metrics(w), "pdserve_worker_remote_prefill_requests_total", status="ABORTED", phase=phase)
               for w in workers(cluster, "prefill"))


def test_abort_before_during_after_transfer_and_disconnect_leak_nothing(
        cluster: LocalCluster, reference: Reference, ids: list[int]) -> None:
    wait_quiet(cluster)
    # before: the prefill worker has just received (or not yet) the request
    call = _stream(cluster, prompt(ids, LONG, offset=410), 50)
    time.sleep(0.05)
    call.cancel()
    wait_quiet(cluster, what="abort before the transfer")
    # during: every layer posted, the prefill worker holds the request before confirming (debug delay)
    for w in workers(cluster, "prefill"):
        debug(w, kv_delay_seconds=3.0)
    sending = _aborted(cluster, "sending")
    call = _stream(cluster, prompt(ids, LONG, offset=420), 50)
    wait_for(lambda: any(stats(w).remote_prefills_sending for w in workers(cluster, "prefill")), 30.0,
             interval=0.05, what="a remote prefill with every layer posted")
    call.cancel()
    wait_quiet(cluster, what="abort during the transfer")
    assert _aborted(cluster, "sending") == sending + 1
    for w in workers(cluster, "prefill"):
        debug(w, kv_delay_seconds=0.0)
    # after: the KV is on the decode worker and tokens are streaming
    call = _stream(cluster, prompt(ids, 200, offset=430), 200)
    assert next(call).token_ids
    call.cancel()
    wait_quiet(cluster, what="abort after the transfer")
    # client disconnect (HTTP streaming)
    conn = http.client.HTTPConnection("127.0.0.1", cluster.spec.http_port, timeout=60)
    body = {"model": "smollm2", "prompt": prompt(ids, 300, offset=440), "max_tokens": 500, "ignore_eos": True,
            "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.sock.close()
    conn.close()
    wait_quiet(cluster, what="client disconnect")
    # poison: every free decode block holds garbage; later requests must never attend to one
    assert debug(workers(cluster, "decode")[0], poison_free_blocks=True).poisoned_blocks > 0
    prompts = [prompt(ids, n, offset=5 * n) for n in (12, 17, 100, 333)]
    expect_match(reference, prompts, [tokens_of(r) for r in run_concurrently(cluster, prompts, 10)], 10)
    wait_quiet(cluster)


def _active_prefill(cluster: LocalCluster) -> dict | None:
    return next((w for w in workers(cluster, "prefill") if stats(w).remote_prefills_active), None)


def test_sigkill_prefill_mid_request_completes_and_leaks_nothing(
        cluster: LocalCluster, reference: Reference, ids: list[int], memo: dict) -> None:
    wait_quiet(cluster)
    long = prompt(ids, LONG, offset=600)
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(router_generate, cluster, long, MAX_TOKENS)
        victim = wait_for(lambda: _active_prefill(cluster), 20.0, interval=0.02, what="a prefill worker busy")
        kill_hard(worker_for(cluster, victim["id"]))
        responses = future.result(timeout=120)
    expect_match(reference, [long], [tokens_of(responses)], MAX_TOKENS)
    assert next(r for r in responses if r.token_ids).prefill_worker_id != victim["id"]
    # the decode worker frees the reservation once the dead worker's lease expires
    wait_for(lambda: victim["id"] not in {w["id"] for w in workers(cluster)}, 15.0, what="lease expired")
    wait_quiet(cluster, what="no reservation left on the decode worker")
    memo["victim"] = victim  # restarted by a later test


def test_concurrent_load_1p1d(cluster: LocalCluster, reference: Reference, ids: list[int]) -> None:
    assert len(workers(cluster, "prefill")) == 1
    prompts = mixed_prompts(ids, 32, seed=2)
    results = run_concurrently(cluster, prompts, 8)
    expect_match(reference, prompts, [tokens_of(r) for r in results], 8)
    wait_quiet(cluster)


def test_restarted_prefill_rejoins_and_transfers(cluster: LocalCluster, reference: Reference, ids: list[int],
                                                 memo: dict) -> None:
    victim = memo["victim"]
    cluster.add_worker("prefill", "--worker-id", victim["id"])
    cluster.wait_ready(120.0, count=3)
    decode = workers(cluster, "decode")[0]
    wait_for(lambda: stats(decode).kv_peers == 2, 15.0, what="decode worker loaded the restarted peer")
    rejoined = next(w for w in workers(cluster, "prefill") if w["id"] == victim["id"])
    p = prompt(ids, 150, offset=700)
    out = worker_generate(decode["grpc_address"], p, MAX_TOKENS, peers=[rejoined])
    assert out[0].prefill_worker_id == victim["id"]
    expect_match(reference, [p], [tokens_of(out)], MAX_TOKENS)
    wait_quiet(cluster)


def test_sigkill_decode_mid_request_fails_fast_and_prefill_frees(
        cluster: LocalCluster, reference: Reference, ids: list[int]) -> None:
    wait_quiet(cluster)
    decode = workers(cluster, "decode")[0]
    call = _stream(cluster, prompt(ids, LONG, offset=800), MAX_TOKENS)
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(lambda: list(call))
        wait_for(lambda: _active_prefill(cluster), 20.0, interval=0.02, what="a prefill worker busy")
        killed = time.monotonic()
        kill_hard(worker_for(cluster, decode["id"]))
        with pytest.raises(grpc.RpcError) as info:
            future.result(timeout=30)
    assert time.monotonic() - killed < 10.0
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and decode["id"] in info.value.details()
    wait_for(lambda: decode["id"] not in {w["id"] for w in workers(cluster)}, 15.0, what="decode lease expired")
    wait_quiet(cluster, what="prefill workers released what they held")
    # a decode worker restarted under the same id (same NIXL agent name, new metadata) works again
    cluster.add_worker("decode", "--worker-id", decode["id"])
    cluster.wait_ready(120.0, count=3)
    wait_for(lambda: all(stats(w).kv_peers >= 1 for w in workers(cluster, "prefill")), 15.0, what="peers reloaded")
    p = prompt(ids, 120, offset=900)
    responses = router_generate(cluster, p, MAX_TOKENS)
    assert next(r for r in responses if r.token_ids).prefill_worker_id.startswith("prefill-")
    expect_match(reference, [p], [tokens_of(responses)], MAX_TOKENS)
    wait_quiet(cluster)


@pytest.mark.parametrize("flags, field, theirs, ours", [
    (("--block-size", "32", "--num-blocks", "128"), "block_size", 32, 16),
    (("--dtype", "bfloat16", "--num-blocks", "128"), "dtype", "bfloat16", "float32"),
], ids=["block_size", "dtype"])
def test_incompatible_decode_worker_is_refused_clearly(cluster: LocalCluster, reference: Reference, ids: list[int],
                                                       flags: tuple[str, ...], field: str, theirs: int | str,
                                                       ours: int | str) -> None:
    odd = cluster.add_worker("decode", *flags)
    try:
        cluster.wait_ready(120.0, count=4)
        odd_info = next(w for w in workers(cluster, "decode") if int(w["id"].split("-")[-2]) == odd.pid)
        prefill = workers(cluster, "prefill")[0]
        assert any(f"{field}: {theirs!r} != {ours!r}" in m for m in odd_info["kv_incompatible"]), odd_info
        refusal = f"{field}: local {ours!r} != remote {theirs!r}"
        wait_for(lambda: any(refusal in e for e in stats(prefill).kv_peer_errors), 10.0,
                 what="the prefill worker refused the odd peer")
        p = prompt(ids, 60, offset=1000)
        out = worker_generate(odd_info["grpc_address"], p, MAX_TOKENS, peers=[prefill])  # the router would not pair them
        assert out[0].prefill_worker_id == ""  # prefilled locally, not a crash
        if field != "dtype":  # NOTE: bfloat16 greedy output may differ from the float32 reference
            expect_match(reference, [p], [tokens_of(out)], MAX_TOKENS)
        assert len(tokens_of(out)) == MAX_TOKENS
        assert metric(metrics(odd_info), "pdserve_worker_prefills_total", where="local", reason="incompatible") == 1
        handshake = {"protocol_version": 1, "model": "smollm2", "dtype": "float32", "block_size": 16,
                     "kv_layout": "layer,block,kv,token,head,dim", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64}
        handshake[field] = theirs
        order = worker_pb2.RemotePrefillRequest(
            request_id=f"odd-{field}", prompt_token_ids=p, decode_kv_agent=odd_info["kv_agent"],
            decode_kv_handshake=json.dumps(handshake), block_ids=[0, 1], num_cached_tokens=0,
            prefill_worker_id=prefill["id"])
        OrderBook(cluster.secret, odd_info["id"]).sign(order)  # a cluster member's order: checked for the layout
        answer = worker_stub(prefill["grpc_address"]).RemotePrefill(order, timeout=10)
        assert answer.status == worker_pb2.RemotePrefillResponse.INCOMPATIBLE
        assert refusal in answer.error
        assert odd.alive and sum(c.alive for c in cluster.workers) == 4
    finally:
        odd.stop(20.0)
    wait_for(lambda: len(cluster.live_workers()) == 3, 30.0, what="the odd worker gone from the router")
    wait_quiet(cluster)
