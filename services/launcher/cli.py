"""``pdserve up``: start a local cluster, print how to call it, stop it on Ctrl-C / SIGTERM.

Once the cluster is up, a worker that exits is restarted with backoff (see
``supervisor.py``). Exit codes: 0 after a requested stop, 1 when the router or etcd
dies, a worker keeps failing (``--max-restarts``) or the cluster does not come up,
2 on bad arguments.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from typing import Mapping

from pdserve.cluster.tls import TLSFiles
from pdserve.launcher.cluster import ClusterSpec, LocalCluster
from pdserve.launcher.supervisor import RestartPolicy, Supervisor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve up", description="Bring up etcd, a router and workers locally.")
    p.add_argument("--hybrid", type=int, default=None, help="hybrid workers")
    p.add_argument("--prefill", type=int, default=None, help="prefill workers")
    p.add_argument("--decode", type=int, default=None,
                   help="decode workers (with no worker counts given: 1 prefill + 1 decode)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--etcd", default=None, help="use this etcd instead of starting one")
    p.add_argument("--etcd-plaintext", action="store_true",
                   help="run the etcd pdserve up starts on plain http with no client authentication (anyone on "
                        "this host can then read and write the cluster's keys); by default it speaks mutual TLS "
                        "with throwaway certificates that only the router and workers hold")
    for part in ("ca", "cert", "key"):
        p.add_argument(f"--etcd-{part}", default="", help=f"with --etcd https://...: PEM {part} file the router and "
                                                          "workers use to reach that etcd")
    p.add_argument("--policy", default="least_loaded", choices=("round_robin", "least_loaded", "prefix_aware"))
    p.add_argument("--namespace", default="default")
    p.add_argument("--log-dir", default=None, help="where child logs go (default: a new temp dir)")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--worker-args", default="", help="extra flags for every worker, e.g. \"--num-blocks 512\"")
    p.add_argument("--router-args", default="", help="extra router flags, e.g. \"--local-prefill-threshold 64\"")
    p.add_argument("--gpus", default="", help="comma-separated GPUs; worker i runs on the i-th (round-robin), "
                                              "e.g. \"0,1\" puts a prefill and a decode worker on GPUs 0 and 1")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="restart a worker that exits (backoff 1 s, 2 s ... 30 s) at most this many times in a row "
                        "before stopping everything; 0: never restart (not with --ray)")
    p.add_argument("--ray", action="store_true", help="run the router and workers as Ray actors on a Ray cluster")
    p.add_argument("--address", default="auto", help="with --ray: Ray address (auto, local to start a head, host:port)")
    p.add_argument("--num-gpus-per-worker", type=float, default=0.0, help="with --ray: GPUs per worker (0 on CPU)")
    return p


def topology(hybrid: int | None, prefill: int | None, decode: int | None) -> tuple[int, int, int]:
    """(hybrid, prefill, decode): 1 prefill + 1 decode when no count is given; otherwise
    the counts given, the others 0 (``--hybrid 2`` is two hybrid workers)."""
    if hybrid is None and prefill is None and decode is None:
        return 0, 1, 1
    return hybrid or 0, prefill or 0, decode or 0


# A local CPU cluster is a demo, not a server: each worker's KV cache gets at most this much.
LOCAL_KV_BYTES = 1 << 30
KV_SETTINGS = ("num_blocks", "cache_memory_fraction", "device_type", "config")


def local_worker_args(worker_args: list[str], workers: int, gpus: str, environ: Mapping[str, str],
                      available: int) -> list[str]:
    """Worker flags with a KV-cache size for a local CPU cluster, unless the user chose one.

    The engine's own default (half the free memory, capped by max_batch_size x 1024
    tokens) suits a machine given to one worker; here several workers share the host,
    so each gets ``min(1 GiB, available / (4 x workers))`` as a fraction of free memory.
    """
    chosen = any(a.split("=")[0] == "--" + k.replace("_", "-") for a in worker_args for k in KV_SETTINGS)
    chosen = chosen or gpus or any(f"PDSERVE_{k.upper()}" in environ for k in KV_SETTINGS)
    if chosen or available <= 0:
        return worker_args
    budget = min(LOCAL_KV_BYTES, available // (4 * workers))
    return [*worker_args, "--cache-memory-fraction", f"{max(budget / available, 1e-4):.4f}"]


def available_memory() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def spec_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ,
                   available: int | None = None) -> ClusterSpec:
    hybrid, prefill, decode = topology(args.hybrid, args.prefill, args.decode)
    worker_args = local_worker_args(shlex.split(args.worker_args), hybrid + prefill + decode, args.gpus, environ,
                                    available_memory() if available is None else available)
    if args.etcd and args.etcd_plaintext:
        raise ValueError("--etcd-plaintext is about the etcd pdserve up starts; with --etcd URL the URL's scheme "
                         "(and --etcd-ca/--etcd-cert/--etcd-key) decide")
    return ClusterSpec(hybrid=hybrid, prefill=prefill, decode=decode, model=args.model,
                       http_port=args.http_port, grpc_port=args.grpc_port, etcd=args.etcd, policy=args.policy,
                       namespace=args.namespace, log_dir=args.log_dir, worker_args=tuple(worker_args),
                       router_args=tuple(shlex.split(args.router_args)),
                       gpus=tuple(g.strip() for g in args.gpus.split(",") if g.strip()),
                       etcd_tls=not args.etcd_plaintext,
                       etcd_client=TLSFiles(args.etcd_cert, args.etcd_key, args.etcd_ca))


def banner(cluster: LocalCluster) -> str:
    s = cluster.spec
    roles = ", ".join(f"{n} {r}" for r, n in (("hybrid", s.hybrid), ("prefill", s.prefill), ("decode", s.decode)) if n)
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "What is the capital of France?"}], '
            '"max_tokens": 32}' % s.model)
    return "\n".join([
        f"pdserve is up: {roles} worker(s) serving {s.model}",
        f"  OpenAI HTTP  {cluster.http_url}/v1",
        f"  gRPC         {cluster.grpc_address}  (pdserve.v1.Router)",
        f"  workers      {cluster.http_url}/workers",
        f"  etcd         {cluster.etcd_url}{etcd_note(cluster)}",
        f"  logs         {cluster.log_dir}",
        "try:",
        f"  curl -s {cluster.http_url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'",
        "Ctrl-C stops everything.",
    ])


def etcd_note(cluster: LocalCluster) -> str:
    """How to reach the cluster's etcd by hand (etcdctl), when it needs a client certificate."""
    tls = cluster.etcd_tls
    if not tls.cert:
        return ""
    return f"  (mutual TLS: etcdctl --cacert {tls.ca} --cert {tls.cert} --key {tls.key})"


def main(name: str, argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.ray and args.gpus:
        print(f"pdserve {name}: error: --gpus does not apply with --ray (Ray places workers on GPUs; "
              "use --num-gpus-per-worker)", file=sys.stderr)
        return 2
    if args.ray:
        from pdserve.launcher.ray_cluster import run_with_ray  # imports this module: keep it lazy
        return run_with_ray(args, name)
    try:
        spec = spec_from_args(args)
        policy = RestartPolicy(max_restarts=args.max_restarts)
    except ValueError as exc:
        print(f"pdserve {name}: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = LocalCluster(spec)
    try:
        cluster.start()
        print(f"starting etcd, router and {len(spec.roles)} worker(s); logs in {cluster.log_dir}", flush=True)
        cluster.wait_ready(args.ready_timeout, cancelled=stop.is_set)
        print(banner(cluster), flush=True)
        supervisor = Supervisor(cluster, policy, stopping=stop.is_set)
        while not stop.wait(0.5):
            fatal = supervisor.poll()
            if fatal is not None:
                print(fatal, file=sys.stderr, flush=True)
                return 1
        return 0
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"pdserve {name}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        cluster.stop()
