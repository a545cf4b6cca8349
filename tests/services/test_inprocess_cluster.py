"""Router + worker services around a fake engine, on a real etcd: the APIs, validation,
stop strings, cancellation, drain, dead workers and policies. Fast (seconds)."""
from __future__ import annotations

import asyncio
import http.client
import json
import time
from typing import Any, Iterator

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pdserve.v1 import common_pb2, router_pb2, worker_pb2

from pdserve.common.tokenizer import load_tokenizer
from tests.services.clients import (blocks_used, generate, http_json, live_workers, router_stub, wait_for,
                                    worker_stub)
from tests.services.inproc import InProcessCluster, running_cluster

PROMPT_IDS = [1000]
EXPECTED_IDS = list(range(1001, 1011))  # FakeEngine: previous token + 1


@pytest.fixture(scope="module")
def cluster() -> Iterator[InProcessCluster]:
    yield from running_cluster(num_workers=2)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer("smollm2")


def all_blocks_free(c: InProcessCluster) -> bool:
    return all(not w.engine.blocks for w in c.workers if not w.inflight.draining)


def test_grpc_stream_tokens_text_usage(cluster: InProcessCluster, tokenizer: Any) -> None:
    responses = generate(router_stub(cluster.grpc_address), token_ids=router_pb2.TokenIds(ids=PROMPT_IDS),
                         params={"max_tokens": 10, "temperature": 0.0}, request_id="r1")
    ids = [t for r in responses for t in r.token_ids]
    assert ids == EXPECTED_IDS
    assert "".join(r.text for r in responses) == tokenizer.decode(EXPECTED_IDS)
    last = responses[-1]
    assert last.finish_reason == "length" and all(not r.finish_reason for r in responses[:-1])
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (1, 10, 11)
    assert last.timing.total_seconds >= last.timing.time_to_first_token_seconds > 0
    assert {r.request_id for r in responses} == {"r1"}


def test_grpc_non_stream_and_text_prompt(cluster: InProcessCluster, tokenizer: Any) -> None:
    (only,) = generate(router_stub(cluster.grpc_address), stream=False, text="Hello world",
                       params={"max_tokens": 4})
    prompt = tokenizer.encode("Hello world")
    expected = [prompt[-1] + i for i in range(1, 5)]
    assert list(only.token_ids) == expected and only.text == tokenizer.decode(expected)
    assert only.usage.prompt_tokens == len(prompt) and only.finish_reason == "length"


def test_openai_client_completions_and_chat(cluster: InProcessCluster, tokenizer: Any) -> None:
    client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="none", max_retries=0)
    out = client.completions.create(model="smollm2", prompt=PROMPT_IDS, max_tokens=10, temperature=0)
    assert out.choices[0].text == tokenizer.decode(EXPECTED_IDS) and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (1, 10)
    stream = client.completions.create(model="smollm2", prompt=PROMPT_IDS, max_tokens=10, stream=True,
                                       stream_options={"include_usage": True})
    parts = list(stream)
    assert "".join(p.choices[0].text for p in parts if p.choices) == tokenizer.decode(EXPECTED_IDS)
    assert parts[-1].usage.completion_tokens == 10
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model="smollm2", messages=messages, max_completion_tokens=6)
    prompt = tokenizer.encode_chat(messages)
    assert chat.choices[0].message.content == tokenizer.decode([prompt[-1] + i for i in range(1, 7)])
    assert chat.usage.prompt_tokens == len(prompt)
    deltas = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content
    assert deltas[-1].choices[0].finish_reason == "length"


def test_logprobs_shapes(cluster: InProcessCluster) -> None:
    status, body = http_json(f"{cluster.http_url}/v1/completions",
                             {"model": "smollm2", "prompt": PROMPT_IDS, "max_tokens": 3, "logprobs": 2})
    assert status == 200
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and lp["token_logprobs"] == [-0.5] * 3 and len(lp["top_logprobs"][0]) == 2
    status, body = http_json(f"{cluster.http_url}/v1/chat/completions", {
        "model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "logprobs": True, "top_logprobs": 1})
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and len(content[0]["top_logprobs"]) == 1 and "bytes" in content[0]


def test_stop_string_truncates_and_aborts_worker(cluster: InProcessCluster, tokenizer: Any) -> None:
    full = tokenizer.decode(EXPECTED_IDS)
    stop = tokenizer.decode(EXPECTED_IDS[4:5]).strip()
    start = time.monotonic()
    status, body = http_json(f"{cluster.http_url}/v1/completions", {
        "model": "smollm2", "prompt": PROMPT_IDS, "max_tokens": 400, "stop": [stop]})
    assert status == 200, body
    assert body["choices"][0]["text"] == full[:full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] <= 6
    wait_for(lambda: all_blocks_free(cluster), 2.0, what="blocks freed after the stop string")
    assert time.monotonic() - start < 1.5  # 400 steps would take 2 s: the worker stopped early


def test_stop_token_ids(cluster: InProcessCluster) -> None:
    (only,) = generate(router_stub(cluster.grpc_address), stream=False, token_ids=router_pb2.TokenIds(ids=PROMPT_IDS),
                       params={"max_tokens": 50, "stop_token_ids": [1003]})
    assert list(only.token_ids) == [1001, 1002, 1003] and only.finish_reason == "stop"


def test_http_disconnect_mid_stream_frees_blocks(cluster: InProcessCluster) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", cluster.router.http_port, timeout=10)
    body = {"model": "smollm2", "prompt": PROMPT_IDS, "max_tokens": 1500, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    wait_for(lambda: any(w.engine.blocks for w in cluster.workers), 2.0, what="request running")
    conn.sock.close()
    conn.close()
    wait_for(lambda: all_blocks_free(cluster), 3.0, what="blocks freed after disconnect")
    wait_for(lambda: not any(blocks_used(cluster.http_url).values()), 3.0, what="load report shows free blocks")


def test_grpc_cancel_frees_blocks(cluster: InProcessCluster) -> None:
    request = router_pb2.GenerateRequest(stream=True, token_ids=router_pb2.TokenIds(ids=PROMPT_IDS),
                                         params=common_pb2.SamplingParams(max_tokens=1500))
    call = router_stub(cluster.grpc_address).Generate(request)
    next(call)
    call.cancel()
    wait_for(lambda: all_blocks_free(cluster), 3.0, what="blocks freed after cancel")


BAD_HTTP = [
    ("/v1/completions", b"{not json", "JSON"),
    ("/v1/completions", {"model": "smollm2"}, "prompt"),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": "smollm2", "prompt": [5] * 2048}, "context length"),
    ("/v1/completions", {"model": "smollm2", "prompt": [5] * 100, "max_tokens": 2000}, "context length"),
    ("/v1/completions", {"model": "smollm2", "prompt": [10 ** 7]}, "vocabulary"),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n="),
]


@pytest.mark.parametrize("path, body, needle", BAD_HTTP)
def test_bad_http_requests_get_400(cluster: InProcessCluster, path: str, body: Any, needle: str) -> None:
    raw = body if isinstance(body, bytes) else None
    status, reply = http_json(f"{cluster.http_url}{path}", None if raw else body, raw=raw)
    assert status == 400, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and needle in error["message"]


BAD_GRPC = [
    ({}, "one of text, chat or token_ids"),
    ({"text": ""}, "empty"),
    ({"chat": router_pb2.ChatMessages()}, "chat"),
    ({"text": "x", "params": {"temperature": -1.0}}, "temperature"),
    ({"token_ids": router_pb2.TokenIds(ids=[5] * 4000)}, "context length"),
]


@pytest.mark.parametrize("fields, needle", BAD_GRPC)
def test_bad_grpc_requests_get_invalid_argument(cluster: InProcessCluster, fields: dict, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        generate(router_stub(cluster.grpc_address), **dict(fields))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.details()


def test_an_unknown_model_is_not_found(cluster: InProcessCluster) -> None:
    status, reply = http_json(f"{cluster.http_url}/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and reply["error"]["code"] == "model_not_found" and "nope" in reply["error"]["message"]
    with pytest.raises(grpc.RpcError) as info:
        generate(router_stub(cluster.grpc_address), text="x", model="nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in info.value.details()


def test_cluster_keeps_serving_after_bad_requests(cluster: InProcessCluster) -> None:
    status, body = http_json(f"{cluster.http_url}/v1/completions", {"model": "smollm2", "prompt": "x", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_worker_api_directly(cluster: InProcessCluster) -> None:
    worker = cluster.workers[0]
    address = f"127.0.0.1:{worker.grpc_port}"
    stub = worker_stub(address)
    stats = stub.Stats(worker_pb2.StatsRequest())
    assert stats.worker_id == "fake-0" and stats.kv_blocks_total == 256 and not stats.draining
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(worker_pb2.WorkerGenerateRequest(
            request_id="bad", prompt_token_ids=[1], params=common_pb2.SamplingParams(top_k=0))))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not stub.Abort(worker_pb2.AbortRequest(request_id="nothing")).found
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    reply = health.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Worker"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_models_health_metrics_workers(cluster: InProcessCluster) -> None:
    status, models = http_json(f"{cluster.http_url}/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["smollm2"]
    assert http_json(f"{cluster.http_url}/health") == (200, {"status": "ok", "workers": 2})
    workers = live_workers(cluster.http_url)
    assert {w["role"] for w in workers} == {"hybrid"}
    assert set(workers[0]["load"]) == {"running", "waiting", "kv_blocks_used", "kv_blocks_free", "kv_blocks_cached"}
    from urllib.request import urlopen
    assert b"pdserve_router_requests_total" in urlopen(f"{cluster.http_url}/metrics").read()
    worker_metrics = urlopen(workers[0]["metrics_url"]).read()
    assert b"pdserve_worker_kv_blocks" in worker_metrics and b"pdserve_worker_queue_depth" in worker_metrics
    reply = router_stub(cluster.grpc_address).ListWorkers(router_pb2.ListWorkersRequest())
    assert len(reply.workers) == 2
    assert router_stub(cluster.grpc_address).Health(router_pb2.HealthRequest()).status == "SERVING"


def test_concurrent_requests_spread_over_workers(cluster: InProcessCluster) -> None:
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="none", max_retries=0)
        outs = await asyncio.gather(*[client.completions.create(model="smollm2", prompt=[2000 + i], max_tokens=20)
                                      for i in range(8)])
        return [o.choices[0].text for o in outs]

    texts = asyncio.run(run())
    assert len(set(texts)) == 8
    served = [w for w in cluster.workers if w.metrics.labelled(w.metrics.generated_tokens)._value.get() > 0]
    assert len(served) == 2


def test_reflection_lists_services(cluster: InProcessCluster) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    for address, service in ((cluster.grpc_address, "pdserve.v1.Router"),
                             (f"127.0.0.1:{cluster.workers[0].grpc_port}", "pdserve.v1.Worker")):
        names = set(ProtoReflectionDescriptorDatabase(grpc.insecure_channel(address)).get_services())
        assert {service, "grpc.health.v1.Health"} <= names
