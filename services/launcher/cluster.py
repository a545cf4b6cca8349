"""A local pdserve cluster: etcd, one router and N workers as child processes on loopback.

Lifecycle: ``start()`` starts etcd (unless an external URL is given), the router
and the workers, each in its own process group with its log in ``log_dir`` ->
``wait_ready()`` polls the router's ``GET /workers`` until every worker is seen
(failing fast, with the log tail, if a child exits) -> ``stop()`` stops workers
first (they drain), then the router, then etcd; idempotent, and also run at exit.
Used by ``pdserve up`` and by the end-to-end test fixtures.

The etcd it starts itself speaks mutual TLS by default: ``start()`` makes a
throwaway CA and certificates (``certs.py``), etcd accepts only clients with the
client certificate, and the router and every worker get ``--etcd https://...
--etcd-ca/--etcd-cert/--etcd-key``; ``restart_etcd()`` keeps them, ``stop()``
deletes them. ``ClusterSpec(etcd_tls=False)`` (``pdserve up --etcd-plaintext``)
runs it on plain http instead. An external etcd (``ClusterSpec.etcd``) is reached
with ``ClusterSpec.etcd_client`` (no TLS files: as its URL says).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

from pdserve.cluster.tls import TLSFiles
from pdserve.launcher.certs import EtcdCerts, create_etcd_certs
from pdserve.launcher.etcd_server import EtcdServer, start_etcd
from pdserve.launcher.processes import Child, ProcessGroup, child_env, parse_cpu_list, pdserve_command


@dataclass(frozen=True)
class ClusterSpec:
    hybrid: int = 1
    prefill: int = 0
    decode: int = 0
    model: str = "smollm2"
    http_port: int = 8000
    grpc_port: int = 50051
    etcd: str | None = None
    policy: str = "least_loaded"
    namespace: str = "default"
    log_dir: str | None = None
    drain_timeout: float = 30.0
    lease_ttl: int = 10
    worker_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    gpus: tuple[str, ...] = ()  # worker i sees only gpus[i % len(gpus)] (CUDA_VISIBLE_DEVICES); () = all
    # Worker i runs only on the cores of the CPU list cpus[i % len(cpus)] ("0-3,8"), with OMP_NUM_THREADS
    # their count; () = unpinned.
    cpus: tuple[str, ...] = ()
    etcd_tls: bool = True  # the etcd started here: mutual TLS with throwaway certificates; False: plain http
    etcd_client: TLSFiles = TLSFiles()  # the external etcd's CA and client certificate, when it uses TLS

    def __post_init__(self) -> None:
        counts = (self.hybrid, self.prefill, self.decode)
        if any(n < 0 for n in counts) or sum(counts) == 0:
            raise ValueError(f"worker counts hybrid={self.hybrid} prefill={self.prefill} decode={self.decode}: "
                             "expected at least one worker and no negative count")
        if any(not g.strip() or "," in g for g in self.gpus):
            raise ValueError(f"gpus={list(self.gpus)}: expected one GPU index or UUID per entry")
        for cpu_list in self.cpus:
            try:
                parse_cpu_list(cpu_list)
            except ValueError as exc:
                raise ValueError(f"cpus={list(self.cpus)}: {exc}") from None
        if self.etcd_client.enabled and not self.etcd:
            raise ValueError("etcd TLS files (--etcd-ca/--etcd-cert/--etcd-key) are for an external etcd (--etcd URL); "
                             "the etcd pdserve up starts makes its own certificates")

    @property
    def roles(self) -> list[str]:
        return ["prefill"] * self.prefill + ["decode"] * self.decode + ["hybrid"] * self.hybrid


@dataclass
class LocalCluster:
    spec: ClusterSpec
    group: ProcessGroup = field(default_factory=ProcessGroup)
    etcd_server: EtcdServer | None = None
    router: Child | None = None
    workers: list[Child] = field(default_factory=list)
    etcd_url: str = ""
    etcd_tls: TLSFiles = TLSFiles()  # what the router and workers present to etcd
    etcd_certs: EtcdCerts | None = None  # made by start() for its own etcd, deleted by stop()
    log_dir: str = ""
    # One per cluster unless the caller's environment names one (then every worker shares it).
    secret: str = field(default_factory=lambda: os.environ.get("PDSERVE_CLUSTER_SECRET") or secrets.token_urlsafe(32),
                        repr=False)

    @property
    def http_url(self) -> str:
        scheme = "https" if "--tls-cert" in self.spec.router_args else "http"  # the router serves HTTPS with a cert
        return f"{scheme}://127.0.0.1:{self.spec.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.spec.grpc_port}"

    def start(self) -> "LocalCluster":
        self.log_dir = self.spec.log_dir or tempfile.mkdtemp(prefix="pdserve-logs-")
        os.makedirs(self.log_dir, exist_ok=True)
        if self.spec.etcd:
            self.etcd_url, self.etcd_tls = self.spec.etcd, self.spec.etcd_client
        else:
            self._start_etcd()
        argv = pdserve_command("router", *self.etcd_flags(), "--namespace", self.spec.namespace,
                               "--host", "127.0.0.1", "--grpc-port", str(self.spec.grpc_port),
                               "--http-port", str(self.spec.http_port), "--policy", self.spec.policy,
                               *self.spec.router_args)
        self.router = self.group.spawn(Child("router", argv, os.path.join(self.log_dir, "router.log"),
                                             child_env({"PDSERVE_ROUTER_CLUSTER_SECRET": self.secret})))
        for role in self.spec.roles:
            self.add_worker(role)
        return self

    def _start_etcd(self) -> None:
        if self.spec.etcd_tls:
            self.etcd_certs = create_etcd_certs()
        try:
            self.etcd_server = start_etcd(self.group, self.log_dir, tls=self.etcd_certs)
        except BaseException:
            if self.etcd_certs is not None:  # start() failed: callers need not stop() to remove them
                self.etcd_certs.remove()
                self.etcd_certs = None
            raise
        self.etcd_url, self.etcd_tls = self.etcd_server.url, self.etcd_server.client_tls

    def etcd_flags(self) -> list[str]:
        """``--etcd URL`` and, when etcd uses TLS, ``--etcd-ca/--etcd-cert/--etcd-key`` (router and worker flags)."""
        flags = ["--etcd", self.etcd_url]
        for flag, path in (("--etcd-ca", self.etcd_tls.ca), ("--etcd-cert", self.etcd_tls.cert),
                           ("--etcd-key", self.etcd_tls.key)):
            if path:
                flags += [flag, path]
        return flags

    def etcd_access(self) -> tuple[str, TLSFiles]:
        """What a client of this cluster's etcd needs: ``pdserve.cluster.etcd.connect(*cluster.etcd_access())``."""
        if not self.etcd_url:
            raise RuntimeError("the cluster has no etcd yet: start() first")
        return self.etcd_url, self.etcd_tls

    def restart_etcd(self, keep_data: bool = True) -> EtcdServer:
        """Stop the etcd this cluster started and start it again on the same ports and
        data directory (emptied unless ``keep_data``) with the same certificates, so
        its clients reconnect without a change."""
        old = self.etcd_server
        if old is None:
            raise RuntimeError("restart_etcd: this cluster did not start its etcd (external --etcd, or not started)")
        old.stop(keep_data=keep_data)
        self.group.children.remove(old.child)  # NOTE: a stopped child left in the group reads as a crash
        self.etcd_server = start_etcd(self.group, self.log_dir, ports=old.ports, data_dir=old.data_dir, tls=old.tls)
        return self.etcd_server

    def add_worker(self, role: str = "hybrid", *extra: str) -> Child:
        """Start one more worker process (it registers itself in etcd); later flags in
        ``extra`` override the spec's ``worker_args``.

        NOTE: the worker binds ports the OS picks and advertises them in etcd: a port
        chosen here ahead of time could be taken before the worker (or its restart) binds it."""
        index = len(self.workers)
        argv = pdserve_command("worker", "--role", role, "--model", self.spec.model, *self.etcd_flags(),
                               "--namespace", self.spec.namespace, "--host", "127.0.0.1",
                               "--grpc-port", "0", "--metrics-port", "0",
                               "--drain-timeout", str(self.spec.drain_timeout),
                               "--lease-ttl", str(self.spec.lease_ttl), *self.spec.worker_args, *extra)
        child = Child(f"worker-{index}-{role}", argv, os.path.join(self.log_dir, f"worker-{index}-{role}.log"),
                      self.worker_env(index), cpus=self.worker_cpus(index))
        self.workers.append(self.group.spawn(child))
        return child

    def worker_env(self, index: int) -> dict[str, str]:
        """The environment of the index-th worker: the cluster secret (signs P/D orders;
        in the environment, not on the command line, where ``ps`` shows it), one of
        ``spec.gpus`` when given, and as many OpenMP threads as it has cores when pinned."""
        extra = {"PDSERVE_CLUSTER_SECRET": self.secret}
        if self.spec.gpus:
            extra["CUDA_VISIBLE_DEVICES"] = self.spec.gpus[index % len(self.spec.gpus)]
        if self.spec.cpus:
            extra["OMP_NUM_THREADS"] = str(len(self.worker_cpus(index)))
        return child_env(extra)

    def worker_cpus(self, index: int) -> frozenset[int]:
        """The cores the index-th worker is pinned to (``spec.cpus``); empty when unpinned."""
        if not self.spec.cpus:
            return frozenset()
        return parse_cpu_list(self.spec.cpus[index % len(self.spec.cpus)])

    def live_workers(self) -> list[dict]:
        """The router's ``GET /workers``; [] while the router is not answering."""
        try:
            # NOTE: our own child on loopback: its certificate names the host clients use, not 127.0.0.1
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                 urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
            with opener.open(f"{self.http_url}/workers", timeout=2.0) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return []

    def wait_ready(self, timeout: float = 300.0, count: int | None = None,
                   cancelled: Callable[[], bool] = lambda: False) -> list[dict]:
        """Block until the router lists ``count`` workers (default: all started and alive)."""
        deadline = time.monotonic() + timeout
        while True:
            if cancelled():
                raise InterruptedError("interrupted while waiting for the cluster")
            dead = self.group.first_dead()
            if dead is not None and (dead is self.router or dead is getattr(self.etcd_server, "child", None)
                                     or count is None):
                raise RuntimeError(f"{dead.name} exited with code {dead.proc.returncode}:\n{self.log_tail(dead)}")
            expected = count if count is not None else len(self.workers)
            workers = self.live_workers()
            if len(workers) >= expected:
                return workers
            if time.monotonic() > deadline:
                raise TimeoutError(f"router sees {len(workers)} of {expected} workers after {timeout:.0f} s; "
                                   f"logs in {self.log_dir}")
            time.sleep(0.25)

    def log_tail(self, child: Child, lines: int = 30) -> str:
        try:
            with open(child.log_path or "", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float | None = None) -> None:
        """Workers first (they drain, in parallel), then the router, then etcd."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.spec.drain_timeout + 5.0)
        for worker in self.workers:
            if worker.alive:
                worker.signal(signal.SIGTERM)
        for worker in self.workers:
            worker.stop(max(0.1, deadline - time.monotonic()))
        if self.router is not None:
            self.router.stop(10.0)
        self.group.stop_all(5.0)
        if self.etcd_server is not None:
            self.etcd_server.stop()
            self.etcd_server = None
        if self.etcd_certs is not None:
            self.etcd_certs.remove()
            self.etcd_certs = None
