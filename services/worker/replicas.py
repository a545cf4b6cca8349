"""Data parallelism of one ``pdserve worker``: ``dp`` replicas, each a worker of its own.

Owns: the replica processes of a ``--dp N`` worker and their shutdown. Each replica
runs the same command with ``--dp 1``: its own engine, scheduler and KV cache
(with its own ``tp`` ranks), its own gRPC server and its own etcd registration, so
the router balances over them like over any workers. Fixed ports and an explicit
worker id get the replica index added; on CUDA replica i sees GPUs
``[i * tp, (i + 1) * tp)`` of the visible ones. With ``--ep`` = dp x tp the replicas
share the MoE layers: each keeps ``--dp N`` and gets ``--dp-rank i --dp-port P`` (the
port their group meets on, picked here), so every replica's engine joins one group
(``engine/executor/replica_group.py``); the rest is as above.

Lifecycle: ``run_replicas`` starts every replica, forwards SIGTERM/SIGINT to them
(each drains), and returns once all have exited. If one exits on its own, the
others are stopped too and the exit code is the failed replica's: the worker
fails as a whole and its launcher (``pdserve up``, Kubernetes) restarts it.
"""
from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from typing import Mapping

from pdserve.engine.config import ConfigError
from pdserve.worker.config import WorkerConfig

log = logging.getLogger(__name__)


def replica_argv(argv: list[str], index: int, config: WorkerConfig, worker_id: str | None,
                 dp_port: int = 0) -> list[str]:
    """``argv`` for replica ``index``: the same flags, dp 1 (or, replicas sharing MoE layers,
    its dp rank and their group's port), distinct ports and id."""
    if config.engine.ep_spans_replicas:
        out = [*argv, "--dp-rank", str(index), "--dp-port", str(dp_port)]
    else:
        out = [*argv, "--dp", "1"]
    if config.grpc_port:
        out += ["--grpc-port", str(config.grpc_port + index)]
    if config.metrics_port:
        out += ["--metrics-port", str(config.metrics_port + index)]
    if worker_id:
        out += ["--worker-id", f"{worker_id}-dp{index}"]
    return out


def replica_env(environ: Mapping[str, str], index: int, config: WorkerConfig,
                devices: list[str] | None = None) -> dict[str, str]:
    """The environment of replica ``index``: on CUDA, its share of the visible GPUs."""
    env = dict(environ)
    if config.engine.device_type == "cuda":
        devices = devices if devices is not None else visible_gpus(environ)
        share = gpus_per_replica(config, len(devices))
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[index * share:(index + 1) * share])
    return env


def gpus_per_replica(config: WorkerConfig, visible: int) -> int:
    """A GPU per rank with NCCL; with gloo the ranks may share: up to ``tp``, as far as ``visible`` goes."""
    tp = config.engine.tp
    if config.engine.collectives == "nccl":
        return tp
    return max(1, min(tp, visible // config.engine.dp))


def visible_gpus(environ: Mapping[str, str]) -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES``, else every one torch sees."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def check_ranks_fit(config: WorkerConfig, environ: Mapping[str, str], cores: int) -> None:
    """dp x tp ranks need as many visible GPUs (with tp_backend gloo, a GPU per replica:
    its ranks may share), else ConfigError naming the values. On CPU more ranks than
    cores still run (slower; the rank processes share the cores), so a warning says so."""
    tp, dp = config.engine.tp, config.engine.dp
    if config.engine.device_type == "cuda":
        gpus = visible_gpus(environ)
        need = dp * gpus_per_replica(config, dp)  # NOTE: with gloo, the fewest: one GPU per replica
        if need > len(gpus):
            raise ConfigError(f"dp={dp} x tp={tp} = {tp * dp} ranks need {need} GPUs with "
                              f"{config.engine.collectives}, but {len(gpus)} are visible "
                              f"(CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    elif tp * dp > cores:
        log.warning("dp=%d x tp=%d = %d rank processes on %d cores: they share the cores and run slower", dp, tp,
                    tp * dp, cores)


def run_replicas(argv: list[str], config: WorkerConfig, environ: Mapping[str, str],
                 worker_id: str | None, poll: float = 0.2) -> int:
    """Run ``config.engine.dp`` replicas until they exit; returns the worker's exit code."""
    devices = visible_gpus(environ) if config.engine.device_type == "cuda" else []
    port = _free_port() if config.engine.ep_spans_replicas else 0
    procs = [subprocess.Popen([sys.executable, "-m", "pdserve", "worker",
                               *replica_argv(argv, i, config, worker_id, port)],
                              env=replica_env(environ, i, config, devices)) for i in range(config.engine.dp)]
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while all(p.poll() is None for p in procs):
        time.sleep(poll)
    first = next(p for p in procs if p.poll() is not None)
    if not stopping:
        log.error("replica %d exited with code %s: stopping the other replicas", procs.index(first), first.returncode)
        _stop(procs, config.drain_timeout + 5.0)
    for proc in procs:
        proc.wait()
    return 0 if stopping and all(p.returncode == 0 for p in procs) else (first.returncode or 1)


def is_replica(config: WorkerConfig) -> bool:
    """Whether this worker process is one replica (it serves) rather than the parent of dp
    replicas (it starts them): dp 1, or a replica sharing MoE layers with its group's port set."""
    engine = config.engine
    return engine.dp == 1 or (engine.ep_spans_replicas and engine.dp_port > 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


__all__ = ["check_ranks_fit", "is_replica", "replica_argv", "replica_env", "run_replicas", "visible_gpus"]
