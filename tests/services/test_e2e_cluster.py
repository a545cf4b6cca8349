"""End to end with real processes and the real engine (smollm2, CPU, float32):
etcd + router + two hybrid workers on loopback, shared by the tests of this module.

Order matters: two tests near the end kill and drain workers (each brings a fresh one
up); the last one restarts etcd (mutual TLS, as ``pdserve up`` runs it by default).
"""
from __future__ import annotations

import asyncio
import http.client
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import grpc
import openai
import pytest
from etcd3aio import EtcdError, prefix_range_end
from pdserve.v1 import common_pb2, router_pb2, worker_pb2

from pdserve.cluster.etcd import connect
from pdserve.cluster.keys import KeySpace
from pdserve.cluster.tls import TLSFiles
from pdserve.launcher.cluster import LocalCluster
from tests.services.clients import generate, http_json, live_workers, router_stub, wait_for, worker_stub
from tests.services.cluster_fixture import kill_hard, local_cluster, worker_for

PROMPTS = ["The quick brown fox", "Once upon a time", "def fibonacci(n):", "The capital of France is"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def offline() -> dict[str, Any]:
    """Greedy reference outputs from the offline engine, computed once."""
    from pdserve.common.sampling_params import SamplingParams
    from pdserve.engine import LLM

    llm = LLM(model="smollm2", num_blocks=128)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outs = llm.generate(PROMPTS, params)
    chat = llm.chat(CHAT, params)[0]
    ref = {p: o for p, o in zip(PROMPTS, outs)}
    ref["chat"] = chat
    ref["tokenizer"] = llm.tokenizer
    del llm
    return ref


@pytest.fixture(scope="module")
def cluster(offline: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with local_cluster(hybrid=2, log_dir=str(tmp_path_factory.mktemp("cluster-logs"))) as c:
        yield c


def worker_stats(cluster: LocalCluster) -> list[worker_pb2.StatsResponse]:
    return [worker_stub(w["grpc_address"]).Stats(worker_pb2.StatsRequest(), timeout=5)
            for w in live_workers(cluster.http_url)]


def idle(cluster: LocalCluster) -> bool:
    return all(s.running == 0 and s.waiting == 0 and s.inflight_streams == 0 for s in worker_stats(cluster))


def grpc_greedy(cluster: LocalCluster, prompt: str) -> list[router_pb2.GenerateResponse]:
    return generate(router_stub(cluster.grpc_address), text=prompt, model="smollm2",
                    params={"max_tokens": MAX_TOKENS, "temperature": 0.0})


def http_greedy(cluster: LocalCluster, prompt: str) -> tuple[str, Any, str | None]:
    client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="none", max_retries=0, timeout=120)
    parts = list(client.completions.create(model="smollm2", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    text = "".join(p.choices[0].text for p in parts if p.choices)
    finish = next(p.choices[0].finish_reason for p in reversed(parts) if p.choices)
    return text, parts[-1].usage, finish


def test_concurrent_grpc_and_http_match_offline(cluster: LocalCluster, offline: dict[str, Any]) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        grpc_futures = {p: pool.submit(grpc_greedy, cluster, p) for p in PROMPTS}
        http_futures = {p: pool.submit(http_greedy, cluster, p) for p in PROMPTS}
        for prompt in PROMPTS:
            ref = offline[prompt]
            responses = grpc_futures[prompt].result()
            assert [t for r in responses for t in r.token_ids] == ref.token_ids, prompt
            assert "".join(r.text for r in responses) == ref.text
            usage = responses[-1].usage
            assert (usage.prompt_tokens, usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))
            assert responses[-1].finish_reason == ref.finish_reason
            text, http_usage, finish = http_futures[prompt].result()
            assert (text, finish) == (ref.text, ref.finish_reason), prompt
            assert (http_usage.prompt_tokens, http_usage.completion_tokens) == (usage.prompt_tokens,
                                                                                usage.completion_tokens)


def test_chat_matches_offline(cluster: LocalCluster, offline: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="none", max_retries=0, timeout=120)
    ref = offline["chat"]
    out = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids) and out.usage.completion_tokens == len(ref.token_ids)
    (only,) = generate(router_stub(cluster.grpc_address), stream=False, chat=router_pb2.ChatMessages(
        messages=[router_pb2.ChatMessage(**m) for m in CHAT]), params={"max_tokens": MAX_TOKENS, "temperature": 0.0})
    assert list(only.token_ids) == ref.token_ids and only.text == ref.text


def test_stop_string_over_http(cluster: LocalCluster, offline: dict[str, Any]) -> None:
    ref = offline["chat"]
    stop = ref.text.split()[2]  # a word in the middle of the answer
    status, body = http_json(f"{cluster.http_url}/v1/chat/completions", {
        "model": "smollm2", "messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0, "stop": [stop]})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == ref.text[:ref.text.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    wait_for(lambda: idle(cluster), 5.0, what="workers idle after the stop string")


def test_client_disconnect_frees_blocks(cluster: LocalCluster) -> None:
    wait_for(lambda: idle(cluster), 10.0, what="idle cluster")
    baseline = {s.worker_id: s.kv_blocks_used for s in worker_stats(cluster)}
    conn = http.client.HTTPConnection("127.0.0.1", cluster.spec.http_port, timeout=60)
    body = {"model": "smollm2", "prompt": "Tell me a long story.", "max_tokens": 1000, "ignore_eos": True,
            "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(3):
        assert response.readline().startswith(b"data: ")
        response.readline()
    assert any(s.kv_blocks_used > baseline[s.worker_id] for s in worker_stats(cluster))
    conn.sock.close()
    conn.close()
    wait_for(lambda: idle(cluster), 5.0, what="request aborted on the worker")
    assert {s.worker_id: s.kv_blocks_used for s in worker_stats(cluster)} == baseline


def test_grpc_cancel_frees_blocks(cluster: LocalCluster) -> None:
    request = router_pb2.GenerateRequest(stream=True, text="Tell me a long story.", params=common_pb2.SamplingParams(
        max_tokens=1000, ignore_eos=True))
    call = router_stub(cluster.grpc_address).Generate(request, timeout=60)
    next(call)
    call.cancel()
    wait_for(lambda: idle(cluster), 5.0, what="request aborted on the worker")


@pytest.mark.parametrize("path, body, needle", [
    ("/v1/completions", {"model": "smollm2", "prompt": [7] * 5000}, "context length"),
    ("/v1/completions", {"model": "smollm2", "prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": CHAT}, "gpt-4"),
])
def test_bad_http_inputs(cluster: LocalCluster, path: str, body: dict, needle: str) -> None:
    status, reply = http_json(f"{cluster.http_url}{path}", body)
    expected = 404 if body["model"] == "gpt-4" else 400  # an unknown model: OpenAI's 404 model_not_found
    assert status == expected and needle in reply["error"]["message"], reply


def test_bad_grpc_inputs_and_cluster_keeps_serving(cluster: LocalCluster) -> None:
    stub = router_stub(cluster.grpc_address)
    for fields, code in (({"text": "hi", "params": {"top_p": 2.0}}, grpc.StatusCode.INVALID_ARGUMENT),
                         ({"token_ids": router_pb2.TokenIds(ids=[1] * 5000)}, grpc.StatusCode.INVALID_ARGUMENT),
                         ({"text": "hi", "model": "gpt-4"}, grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.RpcError) as info:
            generate(stub, **fields)
        assert info.value.code() == code
    assert generate(stub, stream=False, text="hi", params={"max_tokens": 2})[0].usage.completion_tokens == 2


def test_hybrid_workers_stay_aggregated_and_debug_rpcs_are_off(cluster: LocalCluster) -> None:
    stats = worker_stats(cluster)
    assert all(s.kv_peers == 0 and not s.kv_peer_errors for s in stats)  # two hybrids never pair (common/roles.py)
    assert all(s.prefills_remote == 0 for s in stats) and sum(s.prefills_local for s in stats) > 0  # aggregated
    with pytest.raises(grpc.RpcError) as info:
        worker_stub(live_workers(cluster.http_url)[0]["grpc_address"]).Debug(worker_pb2.DebugRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_sigkill_worker_is_routed_around(cluster: LocalCluster) -> None:
    workers = live_workers(cluster.http_url)
    assert len(workers) == 2
    victim = worker_for(cluster, workers[0]["id"])
    kill_hard(victim)
    start = time.monotonic()
    stub = router_stub(cluster.grpc_address)
    for _ in range(4):  # right away: the router retries on the live worker
        out = generate(stub, stream=False, text="Hello", params={"max_tokens": 3})[0]
        assert out.worker_id == workers[1]["id"] and out.usage.completion_tokens == 3
    wait_for(lambda: len(live_workers(cluster.http_url)) == 1, 10.0, what="dead worker dropped")
    assert time.monotonic() - start < cluster.spec.lease_ttl + 2.0
    cluster.add_worker("hybrid")
    cluster.wait_ready(240.0, count=2)


def test_sigterm_drains_inflight_and_routes_new_work_elsewhere(cluster: LocalCluster) -> None:
    request = router_pb2.GenerateRequest(stream=True, text="Tell me a story.", params=common_pb2.SamplingParams(
        max_tokens=48, ignore_eos=True, temperature=0.0))
    call = router_stub(cluster.grpc_address).Generate(request, timeout=120)
    first = next(call)
    draining = worker_for(cluster, first.worker_id)
    draining.signal(signal.SIGTERM)
    wait_for(lambda: first.worker_id not in {w["id"] for w in live_workers(cluster.http_url)}, 5.0,
             what="draining worker deregistered")
    other = generate(router_stub(cluster.grpc_address), stream=False, text="Hi", params={"max_tokens": 2})[0]
    assert other.worker_id != first.worker_id
    rest = list(call)
    assert rest[-1].finish_reason == "length"
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 48
    assert draining.wait(30.0) == 0


def registered_workers(cluster: LocalCluster) -> set[str]:
    """Worker ids as etcd itself holds them, read from the test process with the cluster's client certificate."""
    keys = KeySpace(cluster.spec.namespace)

    async def read() -> set[str]:
        client = await connect(*cluster.etcd_access())
        try:
            reply = await client.kv.get(keys.workers_prefix, prefix_range_end(keys.workers_prefix), timeout=5)
        finally:
            await client.close()
        return {keys.parse(kv.key.decode())[1] for kv in reply.kvs}

    return asyncio.run(read())


def test_etcd_speaks_mutual_tls_and_a_restart_keeps_serving(cluster: LocalCluster) -> None:
    """The default ``pdserve up`` etcd: https with client certificates only; restarted with its data and
    the same certificates, the router and workers carry on."""
    url, tls = cluster.etcd_access()
    assert url.startswith("https://127.0.0.1:") and tls.cert and tls.key and tls.ca
    for child in (cluster.router, *cluster.workers):
        argv = child.argv
        assert argv[argv.index("--etcd") + 1] == url and argv[argv.index("--etcd-cert") + 1] == tls.cert
    live = {w["id"] for w in live_workers(cluster.http_url)}
    assert registered_workers(cluster) == live
    with pytest.raises(EtcdError):  # the same etcd, without the client certificate
        asyncio.run(_put_with(url, TLSFiles(ca=tls.ca)))
    cluster.restart_etcd(keep_data=True)
    assert cluster.etcd_access() == (url, tls)
    wait_for(lambda: registered_workers(cluster) == live, 30.0, what="workers still registered after the restart")
    wait_for(lambda: {w["id"] for w in live_workers(cluster.http_url)} == live, 30.0, what="router still sees them")
    out = generate(router_stub(cluster.grpc_address), stream=False, text="Hello", params={"max_tokens": 3})[0]
    assert out.usage.completion_tokens == 3


async def _put_with(url: str, tls: TLSFiles) -> None:
    client = await connect(url, tls)
    try:
        await client.kv.put(b"/pdserve/intruder", b"x", timeout=5)
    finally:
        await client.close()
