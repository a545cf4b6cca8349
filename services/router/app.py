"""The router process: etcd discovery, the gRPC and HTTP servers, and their shutdown.

Lifecycle (``serve``): connect to etcd and read the live workers (retrying until
``etcd_wait`` seconds pass) -> start the gRPC server (Router service behind
``grpc_guard``, grpc health, reflection) and the HTTP server -> wait for SIGTERM /
SIGINT -> stop accepting, give open requests a short grace, close worker channels
and the etcd client, flush the trace spans.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any, Callable

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pdserve.v1 import router_pb2

from pdserve.cluster.discovery import Discovery
from pdserve.cluster.etcd import connect, retry_until_reachable
from pdserve.cluster.keys import KeySpace
from pdserve.common.tracing import Tracing
from pdserve.router.auth import ApiKey
from pdserve.router.config import RouterConfig
from pdserve.router.dispatch import Dispatcher
from pdserve.router.grpc_guard import add_router_service
from pdserve.router.grpc_server import RouterServicer
from pdserve.router.http_server import HttpApi
from pdserve.router.metrics import RouterMetrics
from pdserve.router.models import ModelCatalog
from pdserve.router.policies import MostFreeKV, PrefixAware, make_policy
from pdserve.router.prepare import MaxTokensPolicy
from pdserve.router.service import RouterCore
from pdserve.router.worker_pool import RoutingConfig, WorkerPool
from pdserve.cluster.rpc_auth import token_for
from pdserve.cluster.tls import add_port, new_server

log = logging.getLogger(__name__)
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


class RouterProcess:
    def __init__(self, config: RouterConfig, load_tokenizer: Callable[[str], Any]) -> None:
        self.config = config
        self._load_tokenizer = load_tokenizer
        self.core: RouterCore | None = None
        self.grpc_server: grpc.aio.Server | None = None  # NOTE: made in start(), on the serving loop
        self.health: health.aio.HealthServicer | None = None
        self._runner: web.AppRunner | None = None
        self._etcd = None
        self._tasks: set[asyncio.Task] = set()
        self.tracing = Tracing.start(config.otlp_endpoint, "pdserve-router")  # off without an endpoint
        self.grpc_port = 0
        self.http_port = 0

    async def start(self, etcd_wait: float = 30.0) -> None:
        self._etcd = await connect(self.config.etcd, self.config.tls[1])
        discovery = Discovery(self._etcd, KeySpace(self.config.namespace))
        await retry_until_reachable(discovery.start, etcd_wait, f"etcd at {self.config.etcd}")
        c = self.config
        policies = {"hybrid": make_policy(c.policy, c.prefix_blocks, c.overload_margin), "decode": MostFreeKV(),
                    "prefill": PrefixAware(c.prefix_blocks, c.overload_margin)}
        pool = WorkerPool(discovery, policies, c.suspect_seconds,
                          RoutingConfig(c.local_prefill_threshold, c.prefill_candidates), tls=c.tls[0],
                          token=token_for(c.cluster_secret))
        catalog = ModelCatalog(discovery, self._load_tokenizer, self._tokenizer_failed)
        dispatcher = Dispatcher(pool, c.retry_attempts, self.tracing)
        self.core = RouterCore(discovery, catalog, pool, dispatcher, RouterMetrics(discovery),
                               MaxTokensPolicy(c.default_max_tokens, c.max_tokens_cap), c.max_inflight)
        self.core.catalog.preload()
        await self._start_grpc()
        await self._start_http()
        log.info("router: gRPC on %s:%d, HTTP on %s:%d, policy %s, %d workers", c.host, self.grpc_port, c.host,
                 self.http_port, c.policy, len(discovery.live()))

    async def _start_grpc(self) -> None:
        self.grpc_server = new_server()
        self.health = health.aio.HealthServicer()
        add_router_service(self.grpc_server, RouterServicer(self.core), self._api_key)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection((ROUTER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.grpc_server)
        self.grpc_port = add_port(self.grpc_server, f"{self.config.host}:{self.config.grpc_port}", self.config.tls[0])
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC on {self.config.host}:{self.config.grpc_port}")
        await self.grpc_server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        healthy = not self.core.catalog.problems()
        await self.health.set(ROUTER_SERVICE, health_pb2.HealthCheckResponse.SERVING if healthy
                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    def _tokenizer_failed(self, model: str, cause: str) -> None:
        # grpc.health.v1 for the Router service follows /health (readiness); "" stays SERVING (liveness).
        if self.health is not None:
            task = asyncio.get_running_loop().create_task(
                self.health.set(ROUTER_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _start_http(self) -> None:
        api = HttpApi(self.core, self._api_key, self.config.max_body_bytes)
        self._runner = web.AppRunner(api.app(), handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        https = self.config.tls[0].https_context()  # NOTE: HTTPS whenever gRPC has a certificate
        await web.TCPSite(self._runner, self.config.host, self.config.http_port, ssl_context=https).start()
        self.http_port = self._runner.addresses[0][1]

    @property
    def _api_key(self) -> ApiKey:
        return ApiKey(self.config.api_key, self.config.metrics_require_key)

    async def stop(self, grace: float = 5.0) -> None:
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self._runner is not None:
            await self._runner.cleanup()  # waits for open HTTP handlers (its own timeout)
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace)
        if self.core is not None:
            await self.core.discovery.stop()
            await self.core.pool.close()
        if self._etcd is not None:
            await self._etcd.close()
        self.tracing.shutdown()  # sends the spans still queued


async def serve(config: RouterConfig, load_tokenizer: Callable[[str], Any]) -> int:
    """Run the router until SIGTERM/SIGINT; returns the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    router = RouterProcess(config, load_tokenizer)
    try:
        await router.start()
    except ConnectionError as exc:
        log.error("%s", exc)
        await router.stop(0)
        return 1
    await stop.wait()
    with contextlib.suppress(Exception):
        await router.stop()
    return 0
