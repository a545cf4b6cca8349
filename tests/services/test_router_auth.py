"""The router's API key (--api-key): HTTP /v1/* and /workers need ``Authorization:
Bearer <key>`` (401 in OpenAI's error shape otherwise), /health and by default
/metrics stay open; the gRPC Router service needs the key in its metadata
(UNAUTHENTICATED otherwise) while grpc health and reflection stay open."""
from __future__ import annotations

import hmac
import json
import urllib.error
import urllib.request
from typing import Any, Iterator
from unittest import mock

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pdserve.v1 import router_pb2

from pdserve.router.app import RouterProcess
from pdserve.router.cli import build_parser
from pdserve.router.config import RouterConfig, RouterConfigError
from tests.services.clients import router_stub
from tests.services.inproc import InProcessCluster, running_cluster
from tests.services.test_router_validation import start_router

KEY = "s3cret-key"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def cluster() -> Iterator[InProcessCluster]:
    yield from running_cluster(num_workers=1)


@pytest.fixture(scope="module")
def keyed(cluster: InProcessCluster) -> Iterator[RouterProcess]:
    router = start_router(cluster, api_key=KEY)
    try:
        yield router
    finally:
        cluster.call(router.stop(0.5))


def request(url: str, body: Any = None, authorization: str | None = None) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    data = json.dumps(body).encode() if body is not None else None
    try:
        with _OPENER.open(urllib.request.Request(url, data=data, headers=headers), timeout=30) as response:
            raw = response.read()
            return response.status, dict(response.headers), json.loads(raw) if url.endswith(
                ("json", "models", "workers", "completions", "health")) else raw
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def base(router: RouterProcess) -> str:
    return f"http://127.0.0.1:{router.http_port}"


COMPLETION = {"model": "smollm2", "prompt": [1000], "max_tokens": 2}
PROTECTED = [("/v1/models", None), ("/workers", None), ("/v1/completions", COMPLETION),
             ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "x"}],
                                       "max_tokens": 2})]


@pytest.mark.parametrize("path, body", PROTECTED)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x", KEY, "Bearer "])
def test_protected_paths_need_the_key(keyed: RouterProcess, path: str, body: Any, authorization: str | None) -> None:
    status, headers, reply = request(f"{base(keyed)}{path}", body, authorization)
    assert status == 401, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["code"] == "invalid_api_key"
    assert "Bearer" in reply["error"]["message"] and headers.get("WWW-Authenticate") == "Bearer"
    assert KEY not in json.dumps(reply)


@pytest.mark.parametrize("path, body", PROTECTED)
def test_the_key_opens_protected_paths(keyed: RouterProcess, path: str, body: Any) -> None:
    for authorization in (f"Bearer {KEY}", f"bearer {KEY}"):
        status, _, reply = request(f"{base(keyed)}{path}", body, authorization)
        assert status == 200, reply


def test_health_metrics_and_openapi_stay_open(keyed: RouterProcess) -> None:
    assert request(f"{base(keyed)}/health")[0] == 200
    status, _, metrics = request(f"{base(keyed)}/metrics")
    assert status == 200 and b"pdserve_router_requests_total" in metrics
    status, _, doc = request(f"{base(keyed)}/openapi.json")
    assert status == 200 and doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_unknown_path_under_v1_needs_the_key_too(keyed: RouterProcess) -> None:
    assert request(f"{base(keyed)}/v1/nothing-here")[0] == 401
    assert request(f"{base(keyed)}/v1/nothing-here", authorization=f"Bearer {KEY}")[0] == 404


def test_openai_client_with_and_without_the_key(keyed: RouterProcess) -> None:
    good = openai.OpenAI(base_url=f"{base(keyed)}/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="smollm2", prompt=[1000], max_tokens=2).usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=f"{base(keyed)}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_key_is_compared_in_constant_time(keyed: RouterProcess) -> None:
    with mock.patch("pdserve.cluster.rpc_auth.hmac.compare_digest", wraps=hmac.compare_digest) as compare:
        assert request(f"{base(keyed)}/v1/models", authorization="Bearer guess")[0] == 401
    compare.assert_called_once_with(b"guess", KEY.encode())


def test_no_key_configured_means_open(cluster: InProcessCluster) -> None:
    assert request(f"{cluster.http_url}/v1/models")[0] == 200
    assert request(f"{cluster.http_url}/workers", authorization="Bearer anything")[0] == 200


def test_metrics_require_key(cluster: InProcessCluster) -> None:
    router = start_router(cluster, api_key=KEY, metrics_require_key=True)
    try:
        status, _, reply = request(f"{base(router)}/metrics")
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        assert request(f"{base(router)}/metrics", authorization=f"Bearer {KEY}")[0] == 200
        assert request(f"{base(router)}/health")[0] == 200
    finally:
        cluster.call(router.stop(0.5))


def grpc_metadata(key: str | None) -> list[tuple[str, str]]:
    return [] if key is None else [("authorization", f"Bearer {key}")]


@pytest.mark.parametrize("key", [None, "wrong"])
def test_grpc_router_needs_the_key(keyed: RouterProcess, key: str | None) -> None:
    stub = router_stub(f"127.0.0.1:{keyed.grpc_port}")
    generate = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=[1000]))
    calls = [lambda md: list(stub.Generate(generate, metadata=md, timeout=10)),
             lambda md: stub.ListWorkers(router_pb2.ListWorkersRequest(), metadata=md, timeout=10),
             lambda md: stub.Health(router_pb2.HealthRequest(), metadata=md, timeout=10)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call(grpc_metadata(key))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in info.value.details()


def test_grpc_key_checked_before_the_request_bytes(keyed: RouterProcess) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{keyed.grpc_port}")
    call = channel.unary_stream("/pdserve.v1.Router/Generate", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        list(call(b"\xff\xff", timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        list(call(b"\xff\xff", metadata=grpc_metadata(KEY), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_with_the_key_works_and_health_reflection_stay_open(keyed: RouterProcess) -> None:
    address = f"127.0.0.1:{keyed.grpc_port}"
    stub = router_stub(address)
    request_ = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=[1000]), stream=False)
    (only,) = list(stub.Generate(request_, metadata=grpc_metadata(KEY), timeout=30))
    assert len(only.token_ids) == 16
    assert stub.Health(router_pb2.HealthRequest(), metadata=grpc_metadata(KEY)).status == "SERVING"
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    reply = health.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Router"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    assert "pdserve.v1.Router" in set(ProtoReflectionDescriptorDatabase(grpc.insecure_channel(address)).get_services())


def test_api_key_settings_from_flag_and_env() -> None:
    flags = vars(build_parser().parse_args(["--api-key", "k1", "--metrics-require-key"]))
    config = RouterConfig.build(flags, {"PDSERVE_ROUTER_ETCD": "http://e:1"})
    assert config.api_key == "k1" and config.metrics_require_key is True and "k1" not in repr(config)
    config = RouterConfig.build({}, {"PDSERVE_ROUTER_ETCD": "http://e:1", "PDSERVE_ROUTER_API_KEY": "k2",
                                     "PDSERVE_ROUTER_METRICS_REQUIRE_KEY": "true"})
    assert config.api_key == "k2" and config.metrics_require_key is True
    assert RouterConfig(etcd="http://e:1").api_key == ""
    with pytest.raises(RouterConfigError, match="metrics_require_key"):
        RouterConfig(etcd="http://e:1", metrics_require_key=True)
    with pytest.raises(RouterConfigError, match="api_key"):
        RouterConfig(etcd="http://e:1", api_key=" spaced ")
