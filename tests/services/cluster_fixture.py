"""Real multi-process clusters for end-to-end tests: etcd, a router and workers as
child processes on free loopback ports, always torn down.

``local_cluster(...)`` is a context manager around ``pdserve.launcher.LocalCluster``:
every child runs in its own process group; the ``finally`` stops them (workers
drain, then router, then etcd) even when the test fails, and the process group
registry's atexit hook kills anything left if pytest itself is interrupted.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Iterator

from pdserve.launcher.cluster import ClusterSpec, LocalCluster
from pdserve.launcher.processes import Child, free_port

# Small, fixed KV cache per worker so several workers fit on a CI machine.
TEST_WORKER_ARGS = ("--num-blocks", "256", "--max-batch-size", "16", "--dtype", "float32", "--device-type", "cpu")


@contextlib.contextmanager
def local_cluster(hybrid: int = 2, policy: str = "least_loaded", lease_ttl: int = 3, drain_timeout: float = 20.0,
                  log_dir: str | None = None, ready_timeout: float = 240.0, prefill: int = 0, decode: int = 0,
                  worker_args: tuple[str, ...] = (), router_args: tuple[str, ...] = (),
                  model: str = "smollm2") -> Iterator[LocalCluster]:
    """``worker_args`` are appended to ``TEST_WORKER_ARGS`` (later flags win)."""
    spec = ClusterSpec(hybrid=hybrid, prefill=prefill, decode=decode, model=model, http_port=free_port(),
                       grpc_port=free_port(),
                       policy=policy, lease_ttl=lease_ttl, drain_timeout=drain_timeout, log_dir=log_dir,
                       worker_args=TEST_WORKER_ARGS + tuple(worker_args), router_args=tuple(router_args))
    cluster = LocalCluster(spec)
    try:
        cluster.start()
        cluster.wait_ready(ready_timeout)
        yield cluster
    finally:
        cluster.stop(timeout=drain_timeout + 5.0)


def worker_for(cluster: LocalCluster, worker_id: str) -> Child:
    """The child process of a worker, by the id the router reports (``role-host-pid-...``)."""
    pid = int(worker_id.split("-")[-2])
    return next(c for c in cluster.workers if c.pid == pid)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def kill_hard(child: Child) -> None:
    child.signal(signal.SIGKILL)
    child.wait(10.0)


def kill_launcher(launcher: subprocess.Popen, children: list[int]) -> None:
    """After a ``pdserve up`` test: SIGKILL the launcher and its children's groups if any is left."""
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.1)
