"""Time to first token: disaggregated 1P1D against one hybrid worker, long prompts.

Owns: the benchmark only. Starts a real cluster per topology (etcd, router,
workers as processes, ``services.launcher.LocalCluster``), sends each prompt
length a few times one at a time over the OpenAI HTTP API with streaming, and
reports the median time from sending to the first streamed token. Each prompt is
new (random token ids), so no prefix cache helps either side.

Run: ``python -m bench.ttft [--lengths 512 1024 2048] [--repeats 3]``.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import urllib.request

from services.launcher.cluster import ClusterSpec, LocalCluster
from services.launcher.processes import free_port


def _ttft(url: str, prompt: list[int]) -> float:
    body = json.dumps({"model": "smollm2", "prompt": prompt, "max_tokens": 4, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as resp:
        for line in resp:
            if line.startswith(b"data: ") and b'"text"' in line:
                first = time.perf_counter() - start
                for _ in resp:  # drain the stream
                    pass
                return first
    raise RuntimeError("the stream ended without a token")


def _measure(spec: ClusterSpec, lengths: list[int], repeats: int, rng: random.Random) -> dict[int, float]:
    cluster = LocalCluster(spec)
    try:
        cluster.start()
        cluster.wait_ready(600)
        _ttft(cluster.http_url, [rng.randrange(100, 40000) for _ in range(64)])  # warm-up
        return {n: statistics.median(_ttft(cluster.http_url, [rng.randrange(100, 40000) for _ in range(n)])
                                     for _ in range(repeats)) for n in lengths}
    finally:
        cluster.stop(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ttft")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kv-send", default="layerwise", choices=("layerwise", "whole"))
    args = p.parse_args(argv)
    worker_args = ("--num-blocks", "1024", "--dtype", "float32", "--kv-send", args.kv_send)
    topologies = {"1P1D": dict(hybrid=0, prefill=1, decode=1), "hybrid": dict(hybrid=1)}
    results = {}
    for name, counts in topologies.items():
        spec = ClusterSpec(**counts, http_port=free_port(), grpc_port=free_port(), worker_args=worker_args)
        results[name] = _measure(spec, args.lengths, args.repeats, random.Random(0))
    print(f"{'prompt tokens':>14} {'1P1D TTFT s':>12} {'hybrid TTFT s':>14} {'ratio':>6}")
    for n in args.lengths:
        a, b = results["1P1D"][n], results["hybrid"][n]
        print(f"{n:>14} {a:>12.3f} {b:>14.3f} {a / b:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
