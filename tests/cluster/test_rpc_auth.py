"""Worker RPCs need the cluster's token (derived from its secret); health stays open."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pdserve.v1 import worker_pb2, worker_pb2_grpc

from pdserve.cluster.rpc_auth import token_for
from pdserve.cluster.tls import TLSFiles, new_server, open_channel


class Worker(worker_pb2_grpc.WorkerServicer):
    async def Stats(self, request, context):
        return worker_pb2.StatsResponse(running=7)

    async def Generate(self, request, context):
        yield worker_pb2.WorkerGenerateResponse(token_ids=[1])


async def _calls(server_token: str, client_token: str) -> tuple[object, object, object]:
    server = new_server(token=server_token)
    worker_pb2_grpc.add_WorkerServicer_to_server(Worker(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = open_channel(f"127.0.0.1:{port}", TLSFiles(), token=client_token)
    stub, out = worker_pb2_grpc.WorkerStub(channel), []
    try:
        for call in (lambda: stub.Stats(worker_pb2.StatsRequest(), timeout=5),
                     lambda: _collect(stub.Generate(worker_pb2.WorkerGenerateRequest(), timeout=5)),
                     lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)):
            try:
                out.append(await call())
            except grpc.aio.AioRpcError as exc:
                out.append(exc.code())
        return tuple(out)
    finally:
        await channel.close()
        await server.stop(0)


async def _collect(stream) -> list:
    return [r async for r in stream]


def test_the_right_token_passes_on_unary_and_streaming_calls() -> None:
    stats, generated, checked = asyncio.run(_calls(token_for("s"), token_for("s")))
    assert stats.running == 7 and len(generated) == 1 and checked.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("client", ["", token_for("other")])
def test_no_or_a_wrong_token_is_unauthenticated_but_health_answers(client: str) -> None:
    stats, generated, checked = asyncio.run(_calls(token_for("s"), client))
    assert stats == generated == grpc.StatusCode.UNAUTHENTICATED
    assert checked.status == health_pb2.HealthCheckResponse.SERVING


def test_a_cluster_without_a_secret_checks_nothing() -> None:
    assert token_for("") == ""
    stats, generated, _ = asyncio.run(_calls("", ""))
    assert stats.running == 7 and len(generated) == 1
