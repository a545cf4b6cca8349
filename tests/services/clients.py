"""Small blocking clients the service tests share: JSON over HTTP (no proxies), SSE
reading, and gRPC helpers for the router and worker APIs."""
from __future__ import annotations

import collections
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator

import grpc
from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2_grpc

from pdserve.cluster.rpc_auth import token_for

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_json(url: str, body: Any = None, raw: bytes | None = None, timeout: float = 60.0) -> tuple[int, Any]:
    """GET (no body) or POST JSON; returns (status, parsed JSON body)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def sse_events(url: str, body: Any, timeout: float = 60.0) -> list[Any]:
    """POST a streaming request; every ``data:`` payload (JSON, or the string "[DONE]")."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    events = []
    with _OPENER.open(req, timeout=timeout) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def router_stub(address: str) -> router_pb2_grpc.RouterStub:
    return router_pb2_grpc.RouterStub(grpc.insecure_channel(address))


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                    "wait_for_ready", "compression")), grpc.ClientCallDetails):
    pass


class _Token(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Sends the cluster's Worker-RPC token, as the router and decode workers do."""

    def __init__(self, token: str) -> None:
        self._pair = ("authorization", f"Bearer {token}")

    def _details(self, d: Any) -> _Details:
        return _Details(d.method, d.timeout, [*(d.metadata or ()), self._pair], d.credentials, d.wait_for_ready,
                        d.compression)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def worker_stub(address: str, token: str | None = None) -> worker_pb2_grpc.WorkerStub:
    """A Worker stub carrying the test session's cluster token (tests/conftest.py), or ``token``."""
    token = token_for(os.environ.get("PDSERVE_CLUSTER_SECRET", "")) if token is None else token
    channel = grpc.insecure_channel(address)
    return worker_pb2_grpc.WorkerStub(grpc.intercept_channel(channel, _Token(token)) if token else channel)


def generate(stub: router_pb2_grpc.RouterStub, stream: bool = True, **fields: Any) -> list[router_pb2.GenerateResponse]:
    params = fields.pop("params", {})
    request = router_pb2.GenerateRequest(stream=stream, params=common_pb2.SamplingParams(**params), **fields)
    return list(stub.Generate(request, timeout=120))


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(interval)


def live_workers(http_url: str) -> list[dict]:
    return http_json(f"{http_url}/workers")[1]


def blocks_used(http_url: str) -> dict[str, int]:
    return {w["id"]: w["load"]["kv_blocks_used"] for w in live_workers(http_url)}


def chunks(events: list[Any]) -> Iterator[dict]:
    return (e for e in events if isinstance(e, dict))
