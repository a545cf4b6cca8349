"""Soak: a 1P1D cluster under steady streaming load, with every process's memory sampled.

Owns: the benchmark only. Starts a real cluster (etcd, router, a prefill and a decode
worker as processes, ``pdserve.launcher.LocalCluster``), keeps ``--streams`` clients
sending greedy requests of new random prompts (so the prefix cache keeps turning
over) through the router's gRPC API for ``--minutes``, and samples each process's
resident memory (``VmRSS``) every ``--every`` seconds. Prints the samples as they
come and, at the end, per process: first, lowest, highest and last RSS, the growth
over the second half of the run (a leak keeps growing; a warm-up does not), and the
request counts.

Run: ``python -m pdserve.bench.soak [--minutes 30] [--streams 8] [--every 30]``.
"""
from __future__ import annotations

import argparse
import random
import threading
import time

import grpc
from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc

from pdserve.launcher.cluster import ClusterSpec, LocalCluster
from pdserve.launcher.processes import free_port


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _client(stub: router_pb2_grpc.RouterStub, seed: int, stop: threading.Event, counts: dict[str, int]) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        prompt = [rng.randrange(100, 49000) for _ in range(rng.randrange(64, 400))]
        params = common_pb2.SamplingParams(max_tokens=rng.randrange(16, 96), temperature=0.0, ignore_eos=True)
        request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), stream=True, params=params)
        try:
            for _ in stub.Generate(request, timeout=300):
                pass
            counts["ok"] += 1
        except grpc.RpcError as error:
            counts[error.code().name] = counts.get(error.code().name, 0) + 1


def _processes(cluster: LocalCluster) -> dict[str, int]:
    children = [cluster.etcd_server.child, cluster.router, *cluster.workers]
    return {c.name: c.pid for c in children if c is not None}


def _summary(samples: dict[str, list[float]]) -> list[str]:
    lines = ["| process | first MiB | lowest | highest | last | growth over the second half |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, values in samples.items():
        half = values[len(values) // 2]
        lines.append(f"| {name} | {values[0]:.0f} | {min(values):.0f} | {max(values):.0f} | {values[-1]:.0f} | "
                     f"{values[-1] - half:+.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.soak")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--every", type=float, default=30.0, help="seconds between memory samples")
    p.add_argument("--worker-args", default="--num-blocks 512", help="extra flags for both workers")
    args = p.parse_args(argv)
    spec = ClusterSpec(hybrid=0, prefill=1, decode=1, http_port=free_port(), grpc_port=free_port(),
                       worker_args=tuple(args.worker_args.split()), router_args=("--local-prefill-threshold", "16"))
    cluster = LocalCluster(spec).start()
    stop, counts = threading.Event(), {"ok": 0}
    try:
        cluster.wait_ready(300.0)
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(cluster.grpc_address))
        threads = [threading.Thread(target=_client, args=(stub, s, stop, counts), daemon=True)
                   for s in range(args.streams)]
        for t in threads:
            t.start()
        pids, samples = _processes(cluster), {}
        start = time.monotonic()
        while True:
            for name, pid in pids.items():
                samples.setdefault(name, []).append(rss_mib(pid))
            minute = (time.monotonic() - start) / 60
            print(f"{minute:6.1f} min  " + "  ".join(f"{n} {v[-1]:.0f}" for n, v in samples.items()) +
                  f"  (MiB RSS; requests {counts})", flush=True)
            if minute >= args.minutes:
                break
            time.sleep(args.every)
        stop.set()
        for t in threads:
            t.join(310)
        print("\n".join(_summary(samples)))
        print(f"requests: {counts}")
        return 0
    finally:
        stop.set()
        cluster.stop()


if __name__ == "__main__":
    raise SystemExit(main())
