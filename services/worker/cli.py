"""``pdserve worker``: parse flags, build the one WorkerConfig, load the engine, serve.

Bad configuration prints one line (``pdserve worker: error: ...``) and exits 2.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys

from pdserve.engine.config import ConfigError, EngineConfig
from pdserve.cluster.tls import add_tls_flags


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage dump
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pdserve worker", description="Run one pdserve worker (engine + gRPC + etcd registration).")
    p.add_argument("--config", help="YAML file whose keys are engine / worker config fields")
    p.add_argument("--etcd", help="etcd endpoint(s), e.g. http://127.0.0.1:2379")
    add_tls_flags(p)
    p.add_argument("--namespace", help="cluster namespace in etcd (default: default)")
    p.add_argument("--host", help="bind address (default 0.0.0.0)")
    p.add_argument("--grpc-port", dest="grpc_port", help="gRPC port (0 = any free port)")
    p.add_argument("--metrics-port", dest="metrics_port", help="Prometheus HTTP port (0 = any free port)")
    p.add_argument("--advertise-host", dest="advertise_host", help="host the router dials (default: bind address)")
    p.add_argument("--worker-id", dest="worker_id", help="unique id (default: role-host-pid-random)")
    p.add_argument("--drain-timeout", dest="drain_timeout", help="seconds to finish in-flight work on SIGTERM")
    p.add_argument("--lease-ttl", dest="lease_ttl", help="etcd lease TTL in seconds (default 10)")
    p.add_argument("--kv-transfer", dest="kv_transfer", help="true|false: run a NIXL agent for P/D (default true)")
    p.add_argument("--kv-send", dest="kv_send", help="auto (default: layerwise on GPUs, whole on CPU) | layerwise (overlap with compute) | whole")
    p.add_argument("--local-prefill-threshold", dest="local_prefill_threshold",
                   help="decode side: prompts with fewer uncached tokens prefill locally (default 32)")
    p.add_argument("--remote-prefill-timeout", dest="remote_prefill_timeout",
                   help="decode side: deadline of one RemotePrefill call in seconds (default 120)")
    p.add_argument("--kv-transfer-timeout", dest="kv_transfer_timeout",
                   help="prefill side: seconds to wait for KV writes to finish (default 30)")
    p.add_argument("--debug-rpcs", dest="debug_rpcs", help="true|false: allow the Debug RPC (tests only)")
    p.add_argument("--otlp-endpoint", dest="otlp_endpoint",
                   help="send OpenTelemetry spans to this OTLP gRPC collector, e.g. http://otel-collector:4317 "
                        "(default: tracing off)")
    p.add_argument("--cluster-secret-file", dest="cluster_secret_file",
                   help="file holding the cluster secret (else env PDSERVE_CLUSTER_SECRET); signs P/D orders")
    for f in dataclasses.fields(EngineConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, help=f"engine {f.name} ({f.type})")
    return p


def read_secret_file(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path) as fh:
            secret = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"cluster_secret_file={path!r} cannot be read: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"cluster_secret_file={path!r} is empty")
    return secret


def main(name: str, argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s worker %(name)s: %(message)s")
    from pdserve.worker.config import build_worker_config
    from pdserve.worker.replicas import check_ranks_fit, is_replica

    try:
        args = vars(build_parser().parse_args(argv))
        config_path = args.pop("config")
        args["cluster_secret"] = read_secret_file(args.pop("cluster_secret_file"))
        config = build_worker_config(args, os.environ, config_path)
        if config.engine.dp == 1 or not is_replica(config):  # NOTE: a replica of a group was checked by its parent
            check_ranks_fit(config, os.environ, os.cpu_count() or 1)
    except ConfigError as exc:
        print(f"pdserve {name}: error: {exc}", file=sys.stderr)
        return 2
    if not is_replica(config):
        from pdserve.worker.replicas import run_replicas

        return run_replicas(argv, config, os.environ, args.get("worker_id") or os.environ.get("PDSERVE_WORKER_ID"))
    from pdserve.worker.process import load_engine, serve

    try:
        engine = load_engine(config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pdserve {name}: error: cannot load model {config.engine.model!r}: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config, engine))
