"""An in-process cluster for fast tests: a real etcd (child process), workers wrapping
``FakeEngine`` and a real router, all on one event loop in a background thread.

Tests talk to it with ordinary blocking clients (grpc, urllib, openai) from the
main thread; ``call(coro)`` runs a coroutine on the cluster's loop.
"""
from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Coroutine, Iterator

from pdserve.common.tokenizer import load_tokenizer
from pdserve.engine.config import EngineConfig
from pdserve.launcher.etcd_server import EtcdServer, start_etcd
from pdserve.launcher.processes import ProcessGroup
from pdserve.router.app import RouterProcess
from pdserve.router.config import RouterConfig
from pdserve.worker.config import WorkerConfig
from pdserve.worker.process import WorkerProcess
from tests.services.clients import live_workers, wait_for
from tests.services.fake_engine import FakeEngine


@dataclass
class InProcessCluster:
    policy: str = "least_loaded"
    model: str = "smollm2"
    group: ProcessGroup = field(default_factory=ProcessGroup)
    etcd: EtcdServer | None = None
    router: RouterProcess | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    log_dir: str = ""
    _thread: threading.Thread | None = None

    def start(self, num_workers: int = 2) -> "InProcessCluster":
        self.log_dir = tempfile.mkdtemp(prefix="pdserve-test-")
        self.etcd = start_etcd(self.group, self.log_dir)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        for _ in range(num_workers):
            self.add_worker()
        config = RouterConfig(etcd=self.etcd.url, host="127.0.0.1", grpc_port=0, http_port=0, policy=self.policy,
                              suspect_seconds=3.0)
        self.router = RouterProcess(config, load_tokenizer)
        self.call(self.router.start())
        return self

    def add_worker(self, **engine_kwargs: Any) -> WorkerProcess:
        engine = FakeEngine(**engine_kwargs)
        config = WorkerConfig(engine=EngineConfig(model=self.model), etcd=self.etcd.url, host="127.0.0.1",
                              advertise_host="127.0.0.1", worker_id=f"fake-{len(self.workers)}", drain_timeout=5.0,
                              lease_ttl=2, load_interval=0.2)
        worker = WorkerProcess(config, engine)
        self.call(worker.start())
        self.workers.append(worker)
        return worker

    def call(self, coro: Coroutine, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.router.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.router.grpc_port}"

    def stop(self) -> None:
        try:
            if self.router is not None:
                self.call(self.router.stop(1.0))
            for worker in self.workers:
                if not worker.inflight.draining:
                    self.call(worker.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self._thread is not None:
                self._thread.join(5.0)
            if self.etcd is not None:
                self.etcd.stop()
            self.group.stop_all(2.0)
            shutil.rmtree(self.log_dir, ignore_errors=True)


def running_cluster(num_workers: int = 1) -> Iterator[InProcessCluster]:
    """Start a cluster, wait until the router lists its workers, yield it, stop it (module fixtures)."""
    c = InProcessCluster().start(num_workers=num_workers)
    try:
        wait_for(lambda: len(live_workers(c.http_url)) == num_workers, 10.0, what=f"{num_workers} worker(s)")
        yield c
    finally:
        c.stop()
