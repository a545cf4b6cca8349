"""Bad input at the router: always a 400 / 413 in OpenAI's error shape (or gRPC
INVALID_ARGUMENT) naming the field and its range, never a 500 or a silent accept;
the same rules on HTTP and gRPC; the max_tokens default and cap; /openapi.json.
Runs on the in-process cluster (real etcd and router, fake-engine workers)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Iterator

import grpc
import pytest
from pdserve.v1 import router_pb2

from pdserve.common.tokenizer import load_tokenizer
from pdserve.router.app import RouterProcess
from pdserve.router.cli import build_parser
from pdserve.router.config import RouterConfig, RouterConfigError
from pdserve.router.prepare import MaxTokensPolicy
from pdserve.router.validation import FLOAT_BOUNDS, INT_BOUNDS, ROLES
from tests.services.clients import generate, http_json, router_stub, wait_for
from tests.services.inproc import InProcessCluster, running_cluster

CHAT = [{"role": "user", "content": "hi"}]


def start_router(cluster: InProcessCluster, **fields: Any) -> RouterProcess:
    """A second router on the cluster's etcd and loop, with its own settings (stop it when done)."""
    config = RouterConfig(etcd=cluster.etcd.url, host="127.0.0.1", grpc_port=0, http_port=0, **fields)
    router = RouterProcess(config, load_tokenizer)
    cluster.call(router.start())
    wait_for(lambda: len(router.core.discovery.live()) == len(cluster.workers), 10.0,
             what="the second router sees the workers")
    return router


@pytest.fixture(scope="module")
def cluster() -> Iterator[InProcessCluster]:
    yield from running_cluster(num_workers=1)


@pytest.fixture(scope="module")
def limited(cluster: InProcessCluster) -> Iterator[RouterProcess]:
    router = start_router(cluster, default_max_tokens=5, max_tokens_cap=8, max_body_bytes=4096)
    try:
        yield router
    finally:
        cluster.call(router.stop(0.5))


def post(url: str, body: Any) -> tuple[int, Any]:
    """POST ``body`` as JSON (bytes are sent as they are); Python's json writes inf/nan as Infinity/NaN."""
    return http_json(url, raw=body if isinstance(body, bytes) else json.dumps(body).encode())


def assert_openai_error(status: int, reply: Any, expected: int, *needles: str, param: str | None = None) -> None:
    assert status == expected, reply
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    for needle in needles:
        assert needle in reply["error"]["message"], reply
    if param is not None:
        assert reply["error"]["param"] == param, reply


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": "smollm2", "prompt": "x", "max_tokens": 2, **extra}


# -- finding 1: integers that overflow their wire type, non-finite floats, bad Unicode, deep JSON --------------------

@pytest.mark.parametrize("field, value, range_text", [
    ("top_k", 2**40, "[-1, 2147483647]"),
    ("seed", 2**63, "[0, 9223372036854775807]"),
    ("seed", 2**64, "[0, 9223372036854775807]"),
    ("seed", -1, "[0, 9223372036854775807]"),
    ("stop_token_ids", [2**40], "[0, 2147483647]"),
    ("stop_token_ids", [-5], "[0, 2147483647]"),
    ("max_tokens", 2**40, "[1, 2147483647]"),
    ("max_tokens", 0, "[1, 2147483647]"),
    ("logprobs", 2**40, "[0, 20]"),
])
def test_http_integer_beyond_its_wire_type_gets_400(cluster: InProcessCluster, field: str, value: Any,
                                                    range_text: str) -> None:
    status, reply = post(f"{cluster.http_url}/v1/completions", completion(**{field: value}))
    assert_openai_error(status, reply, 400, field, range_text, param=field)


def test_http_prompt_token_id_beyond_int32_gets_400(cluster: InProcessCluster) -> None:
    status, reply = post(f"{cluster.http_url}/v1/completions", completion(prompt=[1, 2**40]))
    assert_openai_error(status, reply, 400, "prompt", "[0, 2147483647]", param="prompt")


@pytest.mark.parametrize("field", sorted(FLOAT_BOUNDS))
@pytest.mark.parametrize("raw_value", [b"Infinity", b"-Infinity", b"NaN", b"1e400"])
def test_http_non_finite_float_gets_400(cluster: InProcessCluster, field: str, raw_value: bytes) -> None:
    body = b'{"model": "smollm2", "prompt": "x", "max_tokens": 2, "%s": %s}' % (field.encode(), raw_value)
    status, reply = post(f"{cluster.http_url}/v1/completions", body)
    assert_openai_error(status, reply, 400, field, "finite", str(FLOAT_BOUNDS[field]), param=field)


@pytest.mark.parametrize("field, value", [("temperature", 1e39), ("repetition_penalty", 1e-50), ("top_p", 1e-50)])
def test_http_float_that_changes_as_float32_gets_400(cluster: InProcessCluster, field: str, value: float) -> None:
    status, reply = post(f"{cluster.http_url}/v1/completions", completion(**{field: value}))
    assert_openai_error(status, reply, 400, field, str(FLOAT_BOUNDS[field]), param=field)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b'{"model": "smollm2", "prompt": "\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "smollm2", "prompt": "ok \\udfff", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "smollm2", "prompt": "x", "stop": ["\\ud800"]}', "stop[0]"),
    ("/v1/chat/completions", b'{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content"),
    ("/v1/chat/completions",
     b'{"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udc00"}]}]}',
     "messages[0].content[0].text"),
])
def test_http_lone_surrogate_gets_400(cluster: InProcessCluster, path: str, body: bytes, param: str) -> None:
    status, reply = post(f"{cluster.http_url}{path}", body)
    assert_openai_error(status, reply, 400, "surrogate", param=param)


def test_http_surrogate_pair_is_fine(cluster: InProcessCluster) -> None:
    status, reply = post(f"{cluster.http_url}/v1/completions",
                         b'{"model": "smollm2", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}')
    assert status == 200, reply


@pytest.mark.parametrize("depth", [100_000, 1_000, 40])
def test_http_deeply_nested_json_gets_400(cluster: InProcessCluster, depth: int) -> None:
    body = b'{"model": "smollm2", "prompt": "x", "metadata": ' + b"[" * depth + b"]" * depth + b"}"
    status, reply = post(f"{cluster.http_url}/v1/completions", body)
    assert_openai_error(status, reply, 400, "nests too deeply")


def test_http_huge_value_is_echoed_short(cluster: InProcessCluster) -> None:
    status, reply = post(f"{cluster.http_url}/v1/completions", completion(temperature=["x" * 100_000]))
    assert_openai_error(status, reply, 400, "temperature", param="temperature")
    assert len(reply["error"]["message"]) < 300


# -- finding 2: body size ------------------------------------------------------------------------------------------

def test_http_33_mb_body_gets_413(cluster: InProcessCluster) -> None:
    body = json.dumps(completion(prompt="x" * (33 << 20))).encode()
    status, reply = post(f"{cluster.http_url}/v1/completions", body)
    assert_openai_error(status, reply, 413, "8388608", "--max-body-bytes")


def test_max_body_bytes_is_configurable(limited: RouterProcess) -> None:
    url = f"http://127.0.0.1:{limited.http_port}/v1/completions"
    status, reply = post(url, completion(prompt="x" * 5000))
    assert_openai_error(status, reply, 413, "4096")
    chunked = urllib.request.Request(url, data=iter([json.dumps(completion(prompt="y" * 5000)).encode()]),
                                     headers={"Content-Type": "application/json"})  # no length: chunked
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(chunked, timeout=30)
    assert info.value.code == 413 and "4096" in json.loads(info.value.read())["error"]["message"]
    assert post(url, completion(prompt="x" * 100))[0] == 200


def test_request_limit_settings_from_flags_and_env() -> None:
    flags = vars(build_parser().parse_args(["--max-body-bytes", "2048", "--max-tokens-cap", "64",
                                            "--default-max-tokens", "32"]))
    config = RouterConfig.build(flags, {"PDSERVE_ROUTER_ETCD": "http://e:1"})
    assert (config.max_body_bytes, config.max_tokens_cap, config.default_max_tokens) == (2048, 64, 32)
    env = {"PDSERVE_ROUTER_ETCD": "http://e:1", "PDSERVE_ROUTER_MAX_BODY_BYTES": "4096",
           "PDSERVE_ROUTER_MAX_TOKENS_CAP": "7", "PDSERVE_ROUTER_DEFAULT_MAX_TOKENS": "0"}
    config = RouterConfig.build({}, env)
    assert (config.max_body_bytes, config.max_tokens_cap, config.default_max_tokens) == (4096, 7, 0)
    assert RouterConfig(etcd="http://e:1").max_body_bytes == 8 << 20
    for bad in ({"max_body_bytes": 0}, {"max_tokens_cap": -1}, {"default_max_tokens": 2**31}):
        with pytest.raises(RouterConfigError, match=next(iter(bad))):
            RouterConfig(etcd="http://e:1", **bad)


# -- finding 3: one validator for HTTP and gRPC; garbage protobuf ------------------------------------------------

@pytest.mark.parametrize("role", ["tool", "function", "", "System", "robot"])
def test_grpc_refuses_the_roles_http_refuses(cluster: InProcessCluster, role: str) -> None:
    status, reply = post(f"{cluster.http_url}/v1/chat/completions",
                         {"model": "smollm2", "messages": [{"role": role, "content": "x"}], "max_tokens": 2})
    assert_openai_error(status, reply, 400, "messages[0].role", *ROLES, param="messages[0].role")
    with pytest.raises(grpc.RpcError) as info:
        generate(router_stub(cluster.grpc_address), chat=router_pb2.ChatMessages(
            messages=[router_pb2.ChatMessage(role=role, content="x")]), params={"max_tokens": 2})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == reply["error"]["message"]


def test_grpc_developer_role_is_system_as_on_http(cluster: InProcessCluster) -> None:
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    status, reply = post(f"{cluster.http_url}/v1/chat/completions",
                         {"model": "smollm2", "messages": messages, "max_tokens": 2})
    (only,) = generate(router_stub(cluster.grpc_address), stream=False, params={"max_tokens": 2},
                       chat=router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(**m) for m in messages]))
    assert status == 200 and only.usage.prompt_tokens == reply["usage"]["prompt_tokens"]


@pytest.mark.parametrize("field, value", [
    ("temperature", float("inf")), ("temperature", float("nan")), ("top_p", 0.0), ("min_p", 2.0),
    ("presence_penalty", -3.0), ("frequency_penalty", float("-inf")), ("repetition_penalty", 0.0),
    ("top_k", -2), ("seed", -1), ("logprobs", 21), ("max_tokens", 0), ("min_tokens", -1), ("min_tokens", 3),
])
def test_grpc_and_http_give_the_same_answer(cluster: InProcessCluster, field: str, value: Any) -> None:
    raw = json.dumps(completion(prompt=[1000], **{field: value})).encode()
    status, reply = post(f"{cluster.http_url}/v1/completions", raw)
    assert_openai_error(status, reply, 400, field, param=field)
    params = {"max_tokens": 2, field: value}
    with pytest.raises(grpc.RpcError) as info:
        generate(router_stub(cluster.grpc_address), token_ids=router_pb2.TokenIds(ids=[1000]), params=params)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == reply["error"]["message"]


@pytest.mark.parametrize("raw", [b"\xff\xff\xff\xff", b"\x1a\x02\xed\xa0", b"\x0a\x05ab", b"\x32\x03\x08\x80\x80"])
def test_grpc_garbage_bytes_get_invalid_argument(cluster: InProcessCluster, raw: bytes) -> None:
    channel = grpc.insecure_channel(cluster.grpc_address)
    call = channel.unary_stream("/pdserve.v1.Router/Generate", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        list(call(raw, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "pdserve.v1.GenerateRequest" in info.value.details()


def test_grpc_garbage_bytes_on_unary_methods(cluster: InProcessCluster) -> None:
    channel = grpc.insecure_channel(cluster.grpc_address)
    for method in ("Health", "ListWorkers"):
        unary = channel.unary_unary(f"/pdserve.v1.Router/{method}", request_serializer=None,
                                    response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            unary(b"\xff\xff\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert f"pdserve.v1.{method}Request" in info.value.details()


# -- finding 5: max_tokens default and cap --------------------------------------------------------------------------

def test_chat_without_max_tokens_gets_the_default(limited: RouterProcess) -> None:
    url = f"http://127.0.0.1:{limited.http_port}"
    status, reply = post(f"{url}/v1/chat/completions", {"model": "smollm2", "messages": CHAT})
    assert status == 200 and reply["usage"]["completion_tokens"] == 5, reply
    (only,) = generate(router_stub(f"127.0.0.1:{limited.grpc_port}"), stream=False,
                       chat=router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(**CHAT[0])]))
    assert only.usage.completion_tokens == 5


def test_max_tokens_policy_defaults() -> None:
    assert RouterConfig(etcd="http://e:1").default_max_tokens == 4096  # chat no longer runs to the end of the context
    policy = MaxTokensPolicy(chat_default=4096, cap=0)
    assert policy.default(None, room=100_000) == 4096 and policy.default(None, room=100) == 100
    assert policy.default(16, room=100_000) == 16  # completions: OpenAI's default
    assert MaxTokensPolicy(chat_default=0).default(None, room=777) == 777  # 0 = the rest of the context
    assert MaxTokensPolicy(chat_default=4096, cap=64).default(None, room=100_000) == 64
    assert MaxTokensPolicy(cap=8).default(16, room=100) == 8


def test_max_tokens_above_the_cap_gets_400(limited: RouterProcess) -> None:
    url = f"http://127.0.0.1:{limited.http_port}"
    for path, body in (("/v1/completions", completion(max_tokens=9)),
                       ("/v1/chat/completions", {"model": "smollm2", "messages": CHAT, "max_completion_tokens": 9})):
        status, reply = post(f"{url}{path}", body)
        assert_openai_error(status, reply, 400, "at most 8", "--max-tokens-cap", param="max_tokens")
    with pytest.raises(grpc.RpcError) as info:
        generate(router_stub(f"127.0.0.1:{limited.grpc_port}"), text="x", params={"max_tokens": 9})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-tokens-cap" in info.value.details()
    status, reply = post(f"{url}/v1/completions", completion(max_tokens=8))
    assert status == 200 and reply["usage"]["completion_tokens"] == 8


# -- finding 6 (document): /openapi.json ----------------------------------------------------------------------------

def test_openapi_document_describes_the_api(limited: RouterProcess) -> None:
    status, doc = http_json(f"http://127.0.0.1:{limited.http_port}/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/workers", "/metrics"} <= set(
        doc["paths"])
    schemas = doc["components"]["schemas"]
    completion_props = schemas["CompletionRequest"]["properties"]
    assert completion_props["max_tokens"]["maximum"] == 8  # the router's cap
    assert completion_props["seed"]["maximum"] == INT_BOUNDS["seed"].high
    assert completion_props["top_k"]["maximum"] == 2**31 - 1
    assert 0 < completion_props["top_p"]["minimum"] < 1e-44 and completion_props["top_p"]["maximum"] == 1
    chat = schemas["ChatCompletionRequest"]
    assert chat["properties"]["messages"]["items"]["properties"]["role"]["enum"] == list(ROLES)
    assert chat["properties"]["model"]["enum"] == ["smollm2"]


def test_cluster_still_serves_after_bad_input(cluster: InProcessCluster) -> None:
    status, reply = post(f"{cluster.http_url}/v1/completions", completion())
    assert status == 200 and reply["usage"]["completion_tokens"] == 2
    (only,) = generate(router_stub(cluster.grpc_address), stream=False, text="x", params={"max_tokens": 2})
    assert len(only.token_ids) == 2


# -- bounded admission: 429 with Retry-After ---------------------------------------------------------------------------

def test_requests_over_max_inflight_get_429_with_retry_after(cluster: InProcessCluster) -> None:
    import threading

    router = start_router(cluster, max_inflight=1)
    try:
        stub = router_stub(f"127.0.0.1:{router.grpc_port}")
        slow = threading.Thread(target=generate, args=(stub,), kwargs={"text": "x", "params": {"max_tokens": 600}})
        slow.start()
        wait_for(lambda: router.core.inflight == 1, 10.0, what="the slow request admitted")
        request = urllib.request.Request(f"http://127.0.0.1:{router.http_port}/v1/completions",
                                         json.dumps(completion()).encode(), {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10)
        assert info.value.code == 429 and info.value.headers["Retry-After"] == "1"
        assert_openai_error(429, json.loads(info.value.read()), 429, "limit of 1 requests")
        with pytest.raises(grpc.RpcError) as rpc:
            generate(stub, text="x", params={"max_tokens": 2})
        assert rpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        slow.join(30)
        wait_for(lambda: router.core.inflight == 0, 10.0, what="the slow request done")
        status, reply = post(f"http://127.0.0.1:{router.http_port}/v1/completions", completion())
        assert status == 200 and reply["usage"]["completion_tokens"] == 2
    finally:
        cluster.call(router.stop(1.0))


def test_vllm_min_tokens_is_accepted(cluster: InProcessCluster) -> None:
    status, reply = post(f"{cluster.http_url}/v1/completions", completion(prompt=[1000], min_tokens=2))
    assert status == 200 and reply["usage"]["completion_tokens"] == 2, reply
