"""One worker process: engine + gRPC server + metrics + etcd registration + drain.

Lifecycle (``run_worker``):
  1. load the engine (seconds) and start its step loop; build the KV transfer
     agent over the engine's KV tensor (registered once) and, by role, the
     prefill server (prefill | hybrid) and the decode coordinator (decode | hybrid);
  2. start the grpc.aio server (Worker service, grpc health, reflection) and the
     metrics HTTP server; health turns SERVING;
  3. register in etcd with the agent's metadata in the record (the router only
     sees a worker that can already serve); a background task publishes load and
     feeds the step histogram; discovery follows the other workers and keeps the
     KV peers in sync (added, removed, replaced after a restart);
  4. wait for SIGTERM / SIGINT;
  5. drain: refuse new streams with UNAVAILABLE and new remote prefills, health
     NOT_SERVING, revoke the lease (deregister), let in-flight streams and remote
     prefills finish until ``drain_timeout``, abort what is left, stop the
     servers, the KV agent and the engine, flush the trace spans; exit code 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
from typing import Any, MutableMapping

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pdserve.v1 import worker_pb2, worker_pb2_grpc

from pdserve.cluster.discovery import Discovery
from pdserve.cluster.etcd import connect, retry_until_reachable
from pdserve.cluster.keys import KeySpace
from pdserve.cluster.kv_peers import KVPeers
from pdserve.cluster.orders import OrderBook
from pdserve.cluster.records import LoadReport, WorkerRecord
from pdserve.cluster.registry import Registration
from pdserve.common.tracing import Tracing
from pdserve.worker.config import WorkerConfig, resolve_kv_send
from pdserve.worker.metrics import MetricsServer, WorkerMetrics
from pdserve.worker.remote_rpc import RemoteRoles
from pdserve.worker.servicer import Inflight, WorkerServicer
from pdserve.cluster.rpc_auth import token_for
from pdserve.cluster.tls import add_port, new_server

log = logging.getLogger(__name__)
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


def load_engine(config: WorkerConfig) -> Any:
    """Build the real engine (imports torch; only the worker process does this)."""
    from pdserve.engine.async_engine import AsyncEngine

    if config.kv_transfer:
        confine_kv_listener(config.host, os.environ)  # NOTE: before rank processes inherit the environment
    return AsyncEngine(config.engine)


def build_remote_roles(config: WorkerConfig, engine: Any, metrics: WorkerMetrics,
                       tracing: Tracing = Tracing()) -> RemoteRoles:
    """The KV agent and the P/D parts this worker's role needs (none without a real KV cache)."""
    links = engine.kv_links()
    if not config.kv_transfer or (engine.kv_cache is None and not links):
        return RemoteRoles(debug=config.debug_rpcs)
    from pdserve.decode.coordinator import DecodeConfig, DecodeCoordinator
    from pdserve.engine.kv_connector import KVTransfers
    from pdserve.prefill.server import PrefillConfig, PrefillServer

    confine_kv_listener(config.host, os.environ)
    agent = kv_agent(config, engine, links)
    peers = KVPeers(agent, config.worker_id, config.role)
    transfers = KVTransfers(agent)
    orders = OrderBook(config.cluster_secret, config.worker_id)
    if not orders.enabled:
        log.warning("no cluster secret (PDSERVE_CLUSTER_SECRET or --cluster-secret-file): remote-prefill orders "
                    "are not signed, so anyone who reaches a prefill worker's gRPC port can direct KV writes")
    prefill = decode = None
    if config.role in ("prefill", "hybrid"):
        send = resolve_kv_send(config.kv_send, engine.device_type)
        prefill = PrefillServer(engine, peers, transfers, PrefillConfig(transfer_timeout=config.kv_transfer_timeout, send=send),
                                metrics.observe_remote_prefill, tracing)
    if config.role in ("decode", "hybrid"):
        decode = DecodeCoordinator(engine, peers, transfers, DecodeConfig(
            local_prefill_threshold=config.local_prefill_threshold,
            remote_prefill_timeout=config.remote_prefill_timeout, tls=config.tls[0],
            token=token_for(config.cluster_secret)), metrics, orders, tracing)
    return RemoteRoles(peers, transfers, prefill, decode, config.debug_rpcs, config.kv_transfer_timeout, orders)


def kv_agent(config: WorkerConfig, engine: Any, links: list) -> Any:
    """One agent over the engine's KV cache (one rank), or the ranks' agents (tp > 1)."""
    if links:
        from pdserve.engine.kv_connector.rank_agents import RankAgents

        return RankAgents(links, config.worker_id, config.engine.model)
    from pdserve.engine.kv_transfer import NixlKVTransferAgent

    return NixlKVTransferAgent(config.worker_id, engine.kv_cache, config.engine.model,
                               quantization=engine.model_info["quantization"])


def confine_kv_listener(host: str, environ: MutableMapping[str, str]) -> None:
    """A worker bound to loopback keeps its KV transfers there too: UCX's TCP transport
    otherwise listens on every interface. An operator's ``UCX_NET_DEVICES`` wins."""
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback and "UCX_NET_DEVICES" not in environ:
            environ["UCX_NET_DEVICES"] = "lo"


def worker_record(config: WorkerConfig, engine: Any, grpc_port: int, metrics_port: int,
                  peers: KVPeers | None = None) -> WorkerRecord:
    info, stats = engine.model_info, engine.stats()
    host = config.advertise_host
    layout = {k: info.get(k) for k in ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype")}
    return WorkerRecord(
        id=config.worker_id, role=config.role, grpc_address=f"{host}:{grpc_port}",
        metrics_url=f"http://{host}:{metrics_port}/metrics", model=config.engine.model,
        dtype=str(info.get("dtype", config.engine.dtype)), block_size=int(info.get("block_size", config.engine.block_size)),
        max_model_len=int(info["max_model_len"]), tp=config.engine.tp, kv_layout=layout,
        adapters=list(info.get("adapters", [])), quantization=info.get("quantization"),
        capacity={"kv_blocks_total": stats["kv_blocks_total"], "max_batch_size": config.engine.max_batch_size,
                  "vocab_size": info.get("vocab_size")},
        **(peers.identity() if peers is not None else {}),
    )


def load_report(engine: Any, inflight: Inflight) -> LoadReport:
    s = engine.stats()
    return LoadReport(running=s["running"], waiting=s["waiting"], kv_blocks_used=s["kv_blocks_used"],
                      kv_blocks_free=s["kv_blocks_free"], kv_blocks_cached=s["kv_blocks_cached"],
                      kv_blocks_total=s["kv_blocks_total"], tokens_computed_total=s["tokens_computed_total"],
                      draining=inflight.draining, lora_resident=list(s.get("lora_resident", ())))


class WorkerProcess:
    """Wires the pieces of one worker around an engine that was already built."""

    def __init__(self, config: WorkerConfig, engine: Any) -> None:
        self.config = config
        self.engine = engine
        self.inflight = Inflight()
        self.metrics = WorkerMetrics(engine.stats, config.worker_id, config.role, config.engine.model)
        self.health: health.aio.HealthServicer | None = None
        self.server: grpc.aio.Server | None = None  # NOTE: made in start(), on the serving loop
        self.metrics_server = MetricsServer(self.metrics, config.host, config.metrics_port)
        self.registration: Registration | None = None
        self.discovery: Discovery | None = None
        self.remote = RemoteRoles()
        self.tracing = Tracing.start(config.otlp_endpoint, f"pdserve-{config.role}", config.worker_id)  # off if ""
        self._etcd = None
        self._tasks: list[asyncio.Task] = []
        self.grpc_port = 0

    async def start(self) -> None:
        await self.engine.start()
        self.remote = build_remote_roles(self.config, self.engine, self.metrics, self.tracing)
        if self.remote.transfers is not None:
            await self.remote.transfers.start()
        if self.remote.prefill is not None:
            self.remote.prefill.install()
        self.health = health.aio.HealthServicer()
        self.server = new_server(token=token_for(self.config.cluster_secret))
        servicer = WorkerServicer(self.engine, self.inflight, self.metrics, self.config.worker_id, self.config.role,
                                  self.remote, self._republish, self.tracing)
        worker_pb2_grpc.add_WorkerServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((WORKER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.grpc_port = add_port(self.server, f"{self.config.host}:{self.config.grpc_port}", self.config.tls[0])
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC on {self.config.host}:{self.config.grpc_port}")
        await self.server.start()
        await self.metrics_server.start()
        for name in ("", WORKER_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._etcd = await connect(self.config.etcd, self.config.tls[1])
        record = worker_record(self.config, self.engine, self.grpc_port, self.metrics_server.port, self.remote.peers)
        keys = KeySpace(self.config.namespace)
        self.registration = Registration(self._etcd, keys, record, lambda: load_report(self.engine, self.inflight),
                                         ttl=self.config.lease_ttl, load_interval=self.config.load_interval)
        await retry_until_reachable(self.registration.start, 30.0, f"etcd at {self.config.etcd}")
        if self.remote.peers is not None:
            self.discovery = Discovery(self._etcd, keys)
            await retry_until_reachable(self.discovery.start, 30.0, f"etcd at {self.config.etcd}")
            self.remote.peers.start(self.discovery)
        self._tasks.append(asyncio.create_task(self._sample_engine(), name="sample-engine"))
        log.info("worker %s (%s, %s) serving gRPC on %s, metrics on %s", record.id, record.role, record.model,
                 record.grpc_address, record.metrics_url)

    async def _republish(self) -> None:
        """The record again, with the adapters the engine has now."""
        if self.registration is not None:
            await self.registration.republish(worker_record(self.config, self.engine, self.grpc_port,
                                                            self.metrics_server.port, self.remote.peers))

    async def drain(self) -> None:
        """Deregister, refuse new work, finish (or abort) in-flight work, stop everything."""
        log.info("draining: %d in-flight streams, deadline %.1f s", len(self.inflight.ids), self.config.drain_timeout)
        self.inflight.draining = True
        if self.remote.prefill is not None:
            self.remote.prefill.draining = True
        self.metrics.labelled(self.metrics.draining).set(1)
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.registration is not None:
            await self.registration.stop()
        if not await self.inflight.wait_empty(self.config.drain_timeout):
            log.warning("drain deadline passed; aborting %d requests", len(self.inflight.ids))
            for rid in [i for i in self.inflight.ids if not i.startswith("rp:")]:
                if self.remote.decode is not None:
                    self.remote.decode.abort(rid)
                self.engine.abort(rid)
            if self.remote.prefill is not None:
                await self.remote.prefill.abort_all(5.0)
            await self.inflight.wait_empty(5.0)
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.registration is not None:
            await self.registration.stop()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        await self.metrics_server.stop()
        await self._close_remote()
        await self.engine.stop()
        if self._etcd is not None:
            await self._etcd.close()
            self._etcd = None
        self.tracing.shutdown()  # sends the spans still queued

    async def _close_remote(self) -> None:
        if self.remote.decode is not None:
            await self.remote.decode.close()
        if self.discovery is not None:
            await self.discovery.stop()
            self.discovery = None
        if self.remote.transfers is not None:
            await self.remote.transfers.close()
        self.remote = RemoteRoles()

    async def _sample_engine(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.metrics.observe_engine(self.engine.stats())


async def serve(config: WorkerConfig, engine: Any) -> int:
    """Run a worker until SIGTERM/SIGINT, then drain; returns the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = WorkerProcess(config, engine)
    try:
        await worker.start()
    except ConnectionError as exc:
        log.error("%s", exc)
        await worker.close()
        return 1
    except BaseException:
        await worker.close()
        raise
    broken = getattr(engine, "broken", None)
    waits = [asyncio.ensure_future(stop.wait())] + ([asyncio.ensure_future(broken.wait())] if broken else [])
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waits:
        waiter.cancel()
    if broken is not None and broken.is_set():
        log.error("a rank of this worker's engine died: stopping the worker (its launcher restarts it)")
        await worker.close()
        return 1
    await worker.drain()
    return 0
