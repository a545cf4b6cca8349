"""``pdserve up --ray``: the router and every worker as Ray actors on a Ray cluster.

Owns: the launcher's Ray connection (and the Ray head, when ``--address local``
asks it to start one), one placement group per worker (a bundle per tensor-parallel
rank, STRICT_PACK so the ranks share a node), and one ``ProcessHost`` actor per
pdserve process. Each actor runs the very command line the process launcher
(``LocalCluster``) builds, as a child process in its own process group, so workers
register in etcd exactly as they do under ``pdserve up``. ``import ray`` happens only
in this module, and only once Ray is asked for.

Lifecycle of a ``RayCluster``: ``start_ray_cluster()`` connects to Ray -> starts etcd
(or uses ``--etcd``; as under ``pdserve up``, over mutual TLS with throwaway
certificates unless ``--etcd-plaintext``) -> plans the commands with ``LocalCluster`` without spawning
anything -> reserves every worker's placement group (failing with the missing
resources after ``placement_timeout``) -> starts the router actor on this node and a
worker actor in bundle 0 of each group -> ``wait_ready()`` polls the router's
``GET /workers`` until every worker is listed, failing fast with the log tail when a
process exits -> ``stop()``: workers drain in parallel (SIGTERM, then SIGKILL of the
group at the deadline), then the router; actors are killed, placement groups removed,
etcd stopped and its certificates deleted, and a Ray head this launcher started is shut down. ``stop()`` is
idempotent and also runs at exit.

NOTE: if the launcher itself is SIGKILLed, Ray kills its actors but not the pdserve
processes they started (each has its own session); stop the launcher with SIGINT or
SIGTERM.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlparse

from pdserve.cluster.tls import TLSFiles
from pdserve.launcher.certs import EtcdCerts, create_etcd_certs
from pdserve.launcher.cluster import ClusterSpec, LocalCluster
from pdserve.launcher.etcd_server import EtcdServer, start_etcd
from pdserve.launcher.processes import Child, ProcessGroup, child_env

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class RayOptions:
    """How pdserve processes map onto Ray resources.

    Args:
        address: ``ray.init`` address: ``auto`` (the running cluster), ``local`` (start
            a head for this launcher, shut down on stop), ``host:port`` or ``ray://...``.
        num_gpus_per_worker: GPUs per tensor-parallel rank of each worker (0 on CPU).
        cpus_per_worker: CPUs per tensor-parallel rank of each worker.
        tp: tensor-parallel ranks per worker: one placement-group bundle each.
        local_num_cpus: CPUs of a head started for ``local`` (default: all cores).
        placement_timeout: seconds to wait for the placement groups to be placed.
    """
    address: str = "auto"
    num_gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    tp: int = 1
    local_num_cpus: int | None = None
    placement_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.num_gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise ValueError(f"num_gpus_per_worker={self.num_gpus_per_worker}, cpus_per_worker="
                             f"{self.cpus_per_worker}: expected numbers >= 0")
        if self.num_gpus_per_worker == 0 and self.cpus_per_worker == 0:
            raise ValueError("num_gpus_per_worker and cpus_per_worker are both 0: a worker must reserve something")
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"tp={self.tp!r}: expected an integer >= 1")


def bundles(options: RayOptions) -> list[dict[str, float]]:
    """One placement-group bundle per tensor-parallel rank of a worker."""
    bundle = {"CPU": options.cpus_per_worker, "GPU": options.num_gpus_per_worker}
    return [{k: v for k, v in bundle.items() if v > 0} for _ in range(options.tp)]


def plan_processes(spec: ClusterSpec, etcd_url: str, etcd_tls: TLSFiles = TLSFiles()) -> LocalCluster:
    """The process launcher's own router and worker commands (ports, logs, flags), none started."""
    plan = LocalCluster(dataclasses.replace(spec, etcd=etcd_url, etcd_client=etcd_tls),
                        group=_CommandRecorder())  # type: ignore[arg-type]
    return plan.start()


def remote_overrides(node_ip: str) -> list[str]:
    """Flags appended for a worker on another node: bind its own address, let the OS pick ports.

    NOTE: later flags win in argparse, so the planned loopback host and ports are overridden."""
    return ["--host", node_ip, "--grpc-port", "0", "--metrics-port", "0"]


class _CommandRecorder:
    """Stands in for ``ProcessGroup`` while planning: records children instead of spawning them."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def spawn(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def first_dead(self) -> Child | None:
        return None

    def stop_all(self, timeout: float = 0.0) -> None:
        self.children.clear()


class ProcessHost:
    """Actor body: runs one pdserve process on the actor's node and answers for it."""

    def __init__(self) -> None:
        self.child: Child | None = None

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def gpu_ids(self) -> list[str]:
        import ray

        return [str(i) for i in ray.get_gpu_ids()]

    def start(self, name: str, argv: list[str], log_path: str, env: dict[str, str]) -> int:
        """Spawn ``argv`` (its interpreter replaced by this node's) in a new process group.

        NOTE: the process inherits the actor's environment, so Ray's ``CUDA_VISIBLE_DEVICES``
        and ``OMP_NUM_THREADS`` (the actor's ``num_cpus``) apply to it; ``env`` overrides them."""
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        argv = [sys.executable, *argv[1:]]
        self.child = Child(name, argv, log_path, env=child_env(env)).spawn()
        return self.child.pid

    def returncode(self) -> int | None:
        return None if self.child is None or self.child.proc is None else self.child.proc.poll()

    def stop(self, timeout: float) -> int | None:
        return None if self.child is None else self.child.stop(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.child.log_path if self.child and self.child.log_path else "", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class HostedProcess:
    """One pdserve process, the actor hosting it and what it reserved."""
    name: str
    actor: Any
    node_ip: str
    pid: int
    placement_group: Any = None
    rank_slots: list[Any] = field(default_factory=list)


@dataclass
class RayCluster:
    """One ``pdserve up --ray``: its etcd, the hosted router and workers, and what they hold in Ray.

    ``plan`` is the process launcher's ``LocalCluster`` for the same spec (never started):
    it carries the commands, ports, log directory and etcd URL, and answers ``live_workers()``.
    """
    spec: ClusterSpec
    options: RayOptions
    owns_ray: bool
    plan: LocalCluster | None = None
    group: ProcessGroup = field(default_factory=ProcessGroup)
    etcd_server: EtcdServer | None = None
    etcd_certs: EtcdCerts | None = None
    router: HostedProcess | None = None
    workers: list[HostedProcess] = field(default_factory=list)
    launcher_ip: str = ""
    _placement_groups: list[Any] = field(default_factory=list)
    _actors: list[Any] = field(default_factory=list)
    _stopped: bool = False

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.spec.http_port}"

    @property
    def processes(self) -> list[HostedProcess]:
        return [*self.workers, *([self.router] if self.router else [])]

    def start(self) -> "RayCluster":
        import ray

        atexit.register(self.stop)
        log_dir = self.spec.log_dir or tempfile.mkdtemp(prefix="pdserve-logs-")
        self.spec = dataclasses.replace(self.spec, log_dir=log_dir)
        if self.spec.etcd:
            self.plan = plan_processes(self.spec, self.spec.etcd, self.spec.etcd_client)
        else:
            # NOTE: etcd listens on loopback (_check_etcd_reachable), so every process that reads
            # the certificate files runs on this node.
            self.etcd_certs = create_etcd_certs() if self.spec.etcd_tls else None
            self.etcd_server = start_etcd(self.group, log_dir, tls=self.etcd_certs)
            self.plan = plan_processes(self.spec, self.etcd_server.url, self.etcd_server.client_tls)
        self.launcher_ip = ray.util.get_node_ip_address()
        self._reserve(ray, len(self.plan.workers))
        this_node = _on_node(ray.get_runtime_context().get_node_id())
        self.router = self._launch(ray, self._actor(ray, this_node, {"num_cpus": 0}), self.plan.router,
                                   {"PDSERVE_ROUTER_CLUSTER_SECRET": self.plan.secret})
        for child, pg in zip(self.plan.workers, self._placement_groups):
            self.workers.append(self._host_worker(ray, child, pg))
        return self

    def _reserve(self, ray: Any, count: int) -> None:
        """A STRICT_PACK placement group per worker; a clear error when Ray cannot place them."""
        shape = bundles(self.options)
        self._placement_groups = [ray.util.placement_group(shape, strategy="STRICT_PACK") for _ in range(count)]
        try:
            ray.get([pg.ready() for pg in self._placement_groups], timeout=self.options.placement_timeout)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"Ray could not place {count} worker(s) of {shape} within "
                               f"{self.options.placement_timeout:.0f} s; available: {ray.available_resources()}")

    def _actor(self, ray: Any, strategy: Any, resources: dict[str, float]) -> Any:
        actor = ray.remote(ProcessHost).options(scheduling_strategy=strategy, max_restarts=0, **resources).remote()
        self._actors.append(actor)
        return actor

    def _host_worker(self, ray: Any, child: Child, pg: Any) -> HostedProcess:
        """An actor per tensor-parallel rank; the one in bundle 0 runs the worker process."""
        resources = {"num_cpus": self.options.cpus_per_worker, "num_gpus": self.options.num_gpus_per_worker}
        actors = [self._actor(ray, _in_bundle(pg, i), resources) for i in range(self.options.tp)]
        argv, env = list(child.argv), {"PDSERVE_CLUSTER_SECRET": self.plan.secret}  # signs P/D orders
        if self.options.tp > 1:  # NOTE: the worker process drives every rank, so it sees every rank's GPUs
            env["CUDA_VISIBLE_DEVICES"] = ",".join(i for a in actors for i in ray.get(a.gpu_ids.remote()))
            argv += ["--tp", str(self.options.tp)]
        hosted = self._launch(ray, actors[0], dataclasses.replace(child, argv=argv), env)
        hosted.placement_group, hosted.rank_slots = pg, actors[1:]
        return hosted

    def _launch(self, ray: Any, actor: Any, child: Child, env: dict[str, str]) -> HostedProcess:
        node_ip = ray.get(actor.node_ip.remote())
        argv = list(child.argv)
        if node_ip != self.launcher_ip:
            self._check_etcd_reachable(child.name, node_ip)
            argv += remote_overrides(node_ip)
        pid = ray.get(actor.start.remote(child.name, argv, child.log_path or "", env))
        return HostedProcess(child.name, actor, node_ip, pid)

    def _check_etcd_reachable(self, name: str, node_ip: str) -> None:
        etcd_url = self.plan.etcd_url if self.plan else ""
        if urlparse(etcd_url).hostname in LOOPBACK_HOSTS:
            raise RuntimeError(f"{name} was placed on node {node_ip}, but etcd at {etcd_url} is reachable from "
                               "this node only: pass --etcd http://<address every node reaches>:<port>")

    def first_exited(self) -> tuple[str, int | None, str] | None:
        """(name, exit code, log tail) of the first process that is gone, or None."""
        import ray

        for proc in self.processes:
            try:
                code = ray.get(proc.actor.returncode.remote(), timeout=10.0)
                if code is not None:
                    return proc.name, code, ray.get(proc.actor.log_tail.remote(), timeout=10.0)
            except ray.exceptions.RayError as exc:
                return proc.name, None, f"its Ray actor failed: {exc}"
        return None

    def wait_ready(self, timeout: float = 300.0, cancelled: Callable[[], bool] = lambda: False) -> list[dict]:
        """Block until the router lists every worker; fail fast when a process exits."""
        assert self.plan is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            if cancelled():
                raise InterruptedError("interrupted while waiting for the cluster")
            dead = self.first_exited()
            if dead is not None:
                raise RuntimeError(f"{dead[0]} exited with code {dead[1]}:\n{dead[2]}")
            workers = self.plan.live_workers()
            if len(workers) >= len(self.workers):
                return workers
            if time.monotonic() > deadline:
                raise TimeoutError(f"router sees {len(workers)} of {len(self.workers)} workers after "
                                   f"{timeout:.0f} s; logs in {self.plan.log_dir}")
            time.sleep(0.25)

    def stop(self, timeout: float | None = None) -> None:
        """Workers drain in parallel, then the router; then actors, placement groups, etcd, Ray."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        import ray

        if ray.is_initialized():
            drain = timeout if timeout is not None else self.spec.drain_timeout + 5.0
            _stop_processes(ray, self.workers, drain)
            _stop_processes(ray, [self.router] if self.router else [], 10.0)
            self._release(ray)
        _kill_local_groups(self.processes, self.launcher_ip)
        self.group.stop_all(5.0)
        if self.etcd_server is not None:
            self.etcd_server.stop()
            self.etcd_server = None
        if self.etcd_certs is not None:
            self.etcd_certs.remove()
            self.etcd_certs = None
        if self.owns_ray:
            ray.shutdown()

    def _release(self, ray: Any) -> None:
        for actor in self._actors:
            try:
                ray.kill(actor)
            except ray.exceptions.RayError:
                pass
        for pg in self._placement_groups:
            ray.util.remove_placement_group(pg)


def _stop_processes(ray: Any, procs: list[HostedProcess], timeout: float) -> None:
    """Each actor stops its process (SIGTERM, then SIGKILL of the group at ``timeout``), in parallel."""
    refs = [p.actor.stop.remote(timeout) for p in procs]
    try:
        ray.get(refs, timeout=timeout + 10.0)
    except ray.exceptions.RayError:
        pass  # NOTE: a dead actor or a hung stop; _kill_local_groups covers this node


def _kill_local_groups(procs: list[HostedProcess], launcher_ip: str) -> None:
    """SIGKILL the process group of every process on this node, in case its actor died first."""
    for proc in procs:
        if proc.node_ip == launcher_ip:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _in_bundle(pg: Any, index: int) -> Any:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def _on_node(node_id: str) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def connect(options: RayOptions) -> bool:
    """Connect to Ray (starting a head for ``local``); True when this launcher must shut it down."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("`pdserve up --ray` needs Ray: pip install 'ray[default]'") from exc
    if ray.is_initialized():
        return False  # NOTE: the caller's connection; the caller shuts it down
    kwargs: dict[str, Any] = {"logging_level": "warning"}
    if options.address == "local":
        kwargs.update(include_dashboard=False, num_cpus=options.local_num_cpus)
    try:
        ray.init(address=options.address, **kwargs)
    except ConnectionError as exc:
        raise RuntimeError(f"no Ray cluster at {options.address!r} ({exc}): start one with `ray start --head`, "
                           "or pass --address local to start one for this launcher") from exc
    return True


def start_ray_cluster(spec: ClusterSpec, options: RayOptions) -> RayCluster:
    """Connect to Ray and start etcd, the router and the workers; everything is stopped on failure."""
    cluster = RayCluster(spec, options, owns_ray=connect(options))
    try:
        return cluster.start()
    except BaseException:
        cluster.stop(timeout=5.0)
        raise


def run_with_ray(args: argparse.Namespace, name: str = "up") -> int:
    """``pdserve up --ray``: start on Ray, print the ready banner, block until SIGINT/SIGTERM, stop.

    Returns the process launcher's exit codes: 0 after a requested stop, 1 when a
    process dies or the cluster does not come up, 2 on bad arguments."""
    from pdserve.launcher.cli import banner, spec_from_args

    try:
        spec = spec_from_args(args, available=0)  # Ray nodes size their own caches: no local KV budget
        options = RayOptions(address=args.address, num_gpus_per_worker=args.num_gpus_per_worker)
    except ValueError as exc:
        print(f"pdserve {name}: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    _on_stop_signals(stop)
    cluster: RayCluster | None = None
    try:
        print(f"starting etcd, router and {len(spec.roles)} worker(s) on Ray ({options.address})", flush=True)
        cluster = start_ray_cluster(spec, options)
        _on_stop_signals(stop)  # NOTE: ray.init installs its own SIGTERM handler
        cluster.wait_ready(args.ready_timeout, cancelled=stop.is_set)
        print(banner(cluster.plan), flush=True)
        return _serve_until_stopped(cluster, stop)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"pdserve {name}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        if cluster is not None:
            cluster.stop()


def _on_stop_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def _serve_until_stopped(cluster: RayCluster, stop: threading.Event) -> int:
    while not stop.wait(1.0):
        dead = cluster.first_exited()
        if dead is not None:
            print(f"{dead[0]} exited with code {dead[1]}:\n{dead[2]}", file=sys.stderr)
            return 1
    return 0
