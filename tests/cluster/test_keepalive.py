"""A quiet stream survives the clients' keepalive pings (no GOAWAY "too_many_pings").

Seen on a 1P1D cluster: requests queued for KV blocks for minutes kept their streams
open with no data; the router pinged every 10 s and the workers' gRPC servers closed
the connections. Here the same with the ping period scaled down 10x.
"""
from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve.cluster.tls import TLSFiles, new_server, open_channel

PING_MS = 1_000


class QuietHealth(health.aio.HealthServicer):
    async def Watch(self, request, context):  # one message, then nothing for a while
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        await asyncio.sleep(4.0)
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def _quiet_stream(make_server) -> int:
    server = make_server()
    health_pb2_grpc.add_HealthServicer_to_server(QuietHealth(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = open_channel(f"127.0.0.1:{port}", TLSFiles(), options=[("grpc.keepalive_time_ms", PING_MS)])
    try:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=20)
        return len([r async for r in stream])
    finally:
        await channel.close()
        await server.stop(0)


def test_pdserve_servers_accept_the_clients_pings_on_a_quiet_stream() -> None:
    assert asyncio.run(_quiet_stream(lambda: new_server(min_ping_interval_ms=PING_MS // 2))) == 2


def test_grpc_defaults_would_close_it() -> None:
    # The control: gRPC's default server policy (pings without data at most every 5 min).
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(_quiet_stream(grpc.aio.server))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
