"""Time to first token: disaggregated 1P1D against one hybrid worker, long prompts.

Owns: the benchmark only. Starts two real clusters side by side (etcd, router,
workers as processes, ``pdserve.launcher.LocalCluster``): one with a prefill and
a decode worker, one with a single hybrid worker. Requests go one at a time,
alternating between the clusters, so both see the same machine state (an idle
worker burns no CPU); each prompt is new (random token ids), so no prefix cache
helps either side. TTFT is measured at the client: from sending a streaming
``Router.Generate`` (token ids) to the first response carrying a token. Reports
the median per prompt length and the prefill worker's own split of the 1P1D time
(queue + compute, transfer tail after the last layer, hand-over until the
notification), the warm-up excluded.

Run: ``python -m pdserve.bench.ttft [--lengths 512 1024 2048] [--repeats 3]``; on a GPU
``python -m pdserve.bench.ttft --model dummy:llama-3-8b --dtype bfloat16 --device-type cuda
--lengths 1024 4096 8192`` (all three workers share the GPU).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import urllib.request

import grpc
from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from pdserve.launcher.cluster import ClusterSpec, LocalCluster
from pdserve.launcher.processes import free_port


def _ttft(stub: router_pb2_grpc.RouterStub, prompt: list[int]) -> float:
    params = common_pb2.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), stream=True, params=params)
    start = time.perf_counter()
    first = None
    for response in stub.Generate(request, timeout=600):
        if first is None and response.token_ids:
            first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("the stream ended without a token")
    return first


def _prefill_sums(cluster: LocalCluster) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of the prefill worker's remote-prefill histograms, by part."""
    wanted = {"pdserve_worker_remote_prefill_compute_seconds": "compute",
              "pdserve_kv_transfer_tail_seconds": "tail", "pdserve_kv_handover_seconds": "handover"}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for worker in cluster.live_workers():
        if worker["role"] != "prefill":
            continue
        with urllib.request.urlopen(worker["metrics_url"], timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                for metric, name in wanted.items():
                    if sample.name == f"{metric}_sum":
                        sums[name] = sums.get(name, 0.0) + sample.value
                    elif sample.name == f"{metric}_count":
                        counts[name] = counts.get(name, 0.0) + sample.value
    return {name: (sums[name], counts.get(name, 0.0)) for name in sums}


def _mean_split(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    out = {}
    for name, (total, count) in after.items():
        total0, count0 = before.get(name, (0.0, 0.0))
        if count > count0:
            out[name] = (total - total0) / (count - count0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.ttft")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device-type", default="cpu")
    p.add_argument("--num-blocks", type=int, default=1024)
    p.add_argument("--kv-send", default="auto", choices=("auto", "layerwise", "whole"))
    p.add_argument("--gpus", default="", help="GPUs of the 1P1D workers (prefill first), e.g. \"0,1\"; the "
                                             "hybrid worker takes the first; default: all on the visible GPU(s)")
    args = p.parse_args(argv)
    worker_args = ("--num-blocks", str(args.num_blocks), "--dtype", args.dtype, "--device-type", args.device_type,
                   "--kv-send", args.kv_send, "--max-batch-size", "8")
    topologies = {"1P1D": dict(hybrid=0, prefill=1, decode=1), "hybrid": dict(hybrid=1)}
    gpus = tuple(g for g in args.gpus.split(",") if g)
    placement = {"1P1D": gpus, "hybrid": gpus[:1]}
    clusters = {name: LocalCluster(ClusterSpec(**counts, model=args.model, http_port=free_port(),
                                               grpc_port=free_port(), worker_args=worker_args, gpus=placement[name]))
                for name, counts in topologies.items()}
    rng = random.Random(0)
    channels: list[grpc.Channel] = []
    try:
        for cluster in clusters.values():
            cluster.start()
        stubs = {}
        for name, cluster in clusters.items():
            cluster.wait_ready(900)
            channels.append(grpc.insecure_channel(cluster.grpc_address))
            stubs[name] = router_pb2_grpc.RouterStub(channels[-1])
        for stub in stubs.values():  # warm-up: kernels compiled, one transfer done
            _ttft(stub, [rng.randrange(100, 30000) for _ in range(max(args.lengths))])
        before = _prefill_sums(clusters["1P1D"])
        times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in args.lengths} for name in clusters}
        for n in args.lengths:
            for _ in range(args.repeats):
                for name, stub in stubs.items():
                    times[name][n].append(_ttft(stub, [rng.randrange(100, 30000) for _ in range(n)]))
        split = _mean_split(before, _prefill_sums(clusters["1P1D"]))
    finally:
        for channel in channels:
            channel.close()
        for cluster in clusters.values():
            cluster.stop(timeout=30)
    print(f"model={args.model} dtype={args.dtype} device={args.device_type} kv_send={args.kv_send} "
          f"gpus={args.gpus or 'shared'} median of {args.repeats}, alternating clusters")
    print(f"{'prompt tokens':>14} {'1P1D TTFT s':>12} {'hybrid TTFT s':>14} {'ratio':>6}")
    for n in args.lengths:
        a, b = statistics.median(times["1P1D"][n]), statistics.median(times["hybrid"][n])
        print(f"{n:>14} {a:>12.4f} {b:>14.4f} {a / b:>6.2f}")
    print("prefill worker, mean per remote prefill (all lengths, warm-up excluded): "
          + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in split.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
