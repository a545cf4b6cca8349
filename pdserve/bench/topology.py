"""``pdserve bench topology``: one prefill + one decode worker against two hybrid workers, on the same resources.

Owns the comparison of the two cluster topologies under one request stream.
Lifecycle of one invocation: flags become one frozen ``TopologyConfig`` (each
worker's share of the machine, the worker and router flags, and the
``pdserve bench serve`` configuration). Then for each topology in turn (1P1D, then
2 hybrid) a ``LocalCluster`` starts with worker i on share i, is waited for, is
driven through every request rate by ``pdserve.bench.serve.run_bench`` (the same
seed, so the same prompts and arrival times for both), and is stopped before the
next one starts, also on an error, Ctrl-C or SIGTERM; its ``<name>.json`` (the
serve result format, which ``pdserve bench serve --compare`` reads) is written
then. At the end ``comparison.json`` and the compare plots (``serve_report``'s)
are written to ``--output-dir`` and a side-by-side table is printed.

Shares: on CPU worker i is pinned to the i-th set of cores (``ClusterSpec.cpus``)
with as many OpenMP threads; with ``--gpus`` worker i gets the i-th GPU. The
router, etcd and this client run unpinned, alike for both topologies.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import aiohttp

from pdserve.bench import serve
from pdserve.bench.serve_report import BenchResult, Load, RunSummary, to_json, write_plots
from pdserve.launcher.cli import available_memory, local_worker_args
from pdserve.launcher.cluster import ClusterSpec, LocalCluster
from pdserve.launcher.processes import format_cpu_list, free_port, parse_cpu_list
from pdserve.router.config import RouterConfig

SCHEMA = "pdserve.bench.topology/1"
WORKERS = 2  # per topology: the resources are split in this many shares


@dataclass(frozen=True)
class Topology:
    name: str  # file names
    label: str  # tables, plots and result files
    prefill: int = 0
    decode: int = 0
    hybrid: int = 0

    def roles(self) -> list[str]:
        """Worker i's role, in ``ClusterSpec.roles`` order (which gives worker i share i)."""
        return ClusterSpec(hybrid=self.hybrid, prefill=self.prefill, decode=self.decode).roles


TOPOLOGIES = (Topology("1p1d", "1P1D", prefill=1, decode=1), Topology("hybrid", "2 hybrid", hybrid=2))


@dataclass(frozen=True)
class TopologyConfig:
    model: str
    gpus: tuple[str, ...]  # worker i: gpus[i]; () on CPU
    cpus: tuple[str, ...]  # worker i: the CPU list cpus[i]; () unpinned (--gpus without --cpus)
    worker_args: tuple[str, ...]
    router_args: tuple[str, ...]
    serve: serve.ServeConfig  # base_url and label are set per topology
    output_dir: Path
    log_dir: Path
    ready_timeout: float


@dataclass(frozen=True)
class Placement:
    """Where one worker ran: its role, and the cores (as the OS reported them once it was up) or GPU."""
    name: str
    role: str
    cpus: str | None
    gpu: str | None


@dataclass(frozen=True)
class TopologyRun:
    topology: Topology
    workers: tuple[Placement, ...]
    ready_s: float
    prefills: dict[str, int]  # prompts prefilled by where (local | remote), the probe request included
    result: BenchResult


@dataclass(frozen=True)
class Row:
    """One request rate: each topology's summary, in ``TOPOLOGIES`` order."""
    load: Load
    summaries: tuple[RunSummary, ...]

    @property
    def goodput_ratio(self) -> float | None:
        """The first topology's goodput over the second's; None without SLOs or when the second's is 0."""
        first, second = (s.goodput for s in self.summaries)
        if first is None or not second:
            return None
        return first / second


# Flags -> TopologyConfig.

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve bench topology",
                                description="1 prefill + 1 decode worker against 2 hybrid workers on the same "
                                            "cores or GPUs, under the same request stream (pdserve bench serve).")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--gpus", default="", help="two GPUs, comma-separated: worker i of each topology gets the "
                                              "i-th (e.g. 0,1); default: CPU workers")
    p.add_argument("--cpus", help="two core sets, comma-separated, each a core, a range LO-HI or several joined by "
                                  "'+' (e.g. 0,1 or 0-7,8-15 or 0-3+8-11,4-7+12-15): worker i of each topology is "
                                  "pinned to the i-th with OMP_NUM_THREADS its size (default without --gpus: the "
                                  "cores this process may use, split in two halves; with --gpus: unpinned)")
    p.add_argument("--worker-args", default="",
                   help='extra flags for every worker, e.g. "--device-type cuda --dtype bfloat16"')
    p.add_argument("--router-args", default="", help='extra router flags, e.g. "--local-prefill-threshold 0"')
    p.add_argument("--num-prompts", type=int, default=100, help="requests per rate and topology")
    p.add_argument("--request-rate", default="inf",
                   help="Poisson arrival rates in req/s, comma-separated, one run each; inf = all at once")
    p.add_argument("--input-len", type=int, default=256, help="prompt length in tokens (approximately)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dataset", choices=serve.DATASETS, default="random")
    p.add_argument("--slo-ttft-ms", type=float)
    p.add_argument("--slo-tpot-ms", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="bench-topology",
                   help="<topology>.json, comparison.json and the PNG plots go here")
    p.add_argument("--log-dir", help="cluster logs, in one folder per topology (default: <output-dir>/logs)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds for each cluster to come up")
    return p


def config_from_args(args: argparse.Namespace, available_cores: frozenset[int],
                     available_bytes: int) -> TopologyConfig:
    gpus = gpu_list(args.gpus)
    worker_args = local_worker_args(shlex.split(args.worker_args), WORKERS, args.gpus, os.environ, available_bytes)
    output_dir = Path(args.output_dir)
    return TopologyConfig(
        model=args.model, gpus=gpus, cpus=cpu_shares(args.cpus, available_cores, bool(gpus)),
        worker_args=tuple(worker_args), router_args=tuple(shlex.split(args.router_args)),
        serve=serve_config(args), output_dir=output_dir,
        log_dir=Path(args.log_dir) if args.log_dir else output_dir / "logs", ready_timeout=args.ready_timeout)


def gpu_list(text: str) -> tuple[str, ...]:
    gpus = tuple(g.strip() for g in text.split(",") if g.strip())
    if gpus and len(gpus) != WORKERS:
        raise ValueError(f"--gpus takes two GPUs, one per worker (e.g. 0,1), got {text!r}")
    return gpus


def cpu_shares(text: str | None, available: frozenset[int], on_gpus: bool) -> tuple[str, ...]:
    """Each worker's CPU list: from ``--cpus``, else (on CPU) ``available`` split in halves."""
    if text is None:
        return () if on_gpus else split_cores(available)
    try:
        shares = [parse_cpu_list(share.replace("+", ",")) for share in text.split(",")]
    except ValueError as exc:
        raise ValueError(f"--cpus: {exc}") from None
    if len(shares) != WORKERS:
        raise ValueError(f"--cpus takes two core sets, one per worker (e.g. 0,1 or 0-7,8-15), got {text!r}")
    if shares[0] & shares[1]:
        raise ValueError(f"--cpus: the workers' cores overlap ({format_cpu_list(shares[0] & shares[1])})")
    missing = (shares[0] | shares[1]) - available
    if missing:
        raise ValueError(f"--cpus: cores {format_cpu_list(missing)} are not available "
                         f"(this process may use {format_cpu_list(available)})")
    return tuple(format_cpu_list(share) for share in shares)


def split_cores(cores: frozenset[int]) -> tuple[str, ...]:
    """``cores`` in two halves by number (an odd one out goes to the second worker: decode in 1P1D)."""
    ordered = sorted(cores)
    if len(ordered) < WORKERS:
        raise ValueError(f"{len(ordered)} core available: the two workers need one each at least "
                         "(or pass --gpus)")
    half = len(ordered) // WORKERS
    return format_cpu_list(ordered[:half]), format_cpu_list(ordered[half:])


def serve_config(args: argparse.Namespace) -> serve.ServeConfig:
    """The serve benchmark's configuration, through its own flags (so its checks apply)."""
    for flag, value in (("--num-prompts", args.num_prompts), ("--input-len", args.input_len),
                        ("--output-len", args.output_len)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--slo-ttft-ms", args.slo_ttft_ms), ("--slo-tpot-ms", args.slo_tpot_ms)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value:g}")
    flags = [f"--num-prompts={args.num_prompts}", f"--request-rate={args.request_rate}",
             f"--input-len={args.input_len}", f"--output-len={args.output_len}", f"--dataset={args.dataset}",
             f"--seed={args.seed}", "--no-plots"]
    flags += [f"{flag}={value}" for flag, value in (("--slo-ttft-ms", args.slo_ttft_ms),
                                                    ("--slo-tpot-ms", args.slo_tpot_ms)) if value is not None]
    cfg = serve.config_from_args(serve.build_parser().parse_args(flags))
    return dataclasses.replace(cfg, api_key=None)  # our own router: no key, whatever the environment holds


# One topology: cluster up, load, cluster down.

def cluster_spec(cfg: TopologyConfig, topology: Topology) -> ClusterSpec:
    return ClusterSpec(hybrid=topology.hybrid, prefill=topology.prefill, decode=topology.decode, model=cfg.model,
                       http_port=free_port(), grpc_port=free_port(), log_dir=str(cfg.log_dir / topology.name),
                       worker_args=cfg.worker_args, router_args=cfg.router_args, gpus=cfg.gpus, cpus=cfg.cpus)


def describe_shares(cfg: TopologyConfig, topology: Topology) -> str:
    parts = []
    for i, role in enumerate(topology.roles()):
        where = [f"cores {cfg.cpus[i]}" if cfg.cpus else "", f"GPU {cfg.gpus[i]}" if cfg.gpus else ""]
        parts.append(f"worker {i} {role} on {' + '.join(w for w in where if w) or 'any core'}")
    return ", ".join(parts)


def placements(cluster: LocalCluster) -> tuple[Placement, ...]:
    """Each worker's cores as the OS reports them now (the pinning, checked), and its GPU."""
    found = []
    for i, (child, role) in enumerate(zip(cluster.workers, cluster.spec.roles)):
        try:
            cpus: str | None = format_cpu_list(os.sched_getaffinity(child.pid))
        except OSError:
            cpus = None
        gpu = cluster.spec.gpus[i % len(cluster.spec.gpus)] if cluster.spec.gpus else None
        found.append(Placement(child.name, role, cpus, gpu))
    return tuple(found)


def prefill_counts(cluster: LocalCluster) -> dict[str, int]:
    """Prompts prefilled so far by where (``local`` | ``remote``), summed over the workers' metrics: whether
    1P1D really handed prompts over. {} when no worker answers."""
    from prometheus_client.parser import text_string_to_metric_families

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    counts: dict[str, int] = {}
    for worker in cluster.live_workers():
        try:
            with opener.open(worker["metrics_url"], timeout=5.0) as response:
                samples = [sample for family in text_string_to_metric_families(response.read().decode())
                           for sample in family.samples if sample.name == "pdserve_worker_prefills_total"]
        except (OSError, KeyError, ValueError):
            continue
        for sample in samples:
            where = sample.labels.get("where", "?")
            counts[where] = counts.get(where, 0) + int(sample.value)
    return dict(sorted(counts.items()))


def run_topology(cfg: TopologyConfig, topology: Topology, step: str) -> TopologyRun:
    spec = cluster_spec(cfg, topology)
    print(f"== [{step}] {topology.label}: {describe_shares(cfg, topology)}; logs in {spec.log_dir}", flush=True)
    cluster = LocalCluster(spec)
    try:
        started = time.monotonic()
        cluster.start()
        cluster.wait_ready(cfg.ready_timeout)
        ready_s = time.monotonic() - started
        workers = placements(cluster)
        print(f"== [{step}] {topology.label}: ready in {ready_s:.1f} s", flush=True)
        result = asyncio.run(serve.run_bench(dataclasses.replace(cfg.serve, base_url=cluster.http_url,
                                                                 label=topology.label)))
        prefills = prefill_counts(cluster)
    finally:
        cluster.stop()
    config = {**result.config, "topology": topology_json(topology, workers, ready_s, prefills)}
    return TopologyRun(topology, workers, ready_s, prefills, dataclasses.replace(result, config=config))


def progress_line(topology: Topology, summary: RunSummary, load: Load) -> str:
    return (f"{topology.label} @ {load.describe()}: {summary.completed} ok / {summary.failed} failed, "
            f"{summary.request_throughput:.2f} req/s, goodput {_num(summary.goodput, 2)} req/s, "
            f"TTFT p50 {_num(summary.ttft.p50, 1)} ms, TPOT p50 {_num(summary.tpot.p50, 1)} ms")


# The comparison: rows, JSON and table.

def comparison_rows(results: Sequence[BenchResult]) -> list[Row]:
    """Runs of the same load side by side (every result has the same loads, in the same order)."""
    rows = []
    for runs in zip(*(r.runs for r in results)):
        if len({run.load for run in runs}) != 1:
            raise ValueError(f"results of different loads: {[run.load for run in runs]}")
        rows.append(Row(runs[0].load, tuple(run.summary for run in runs)))
    return rows


def topology_json(topology: Topology, workers: Sequence[Placement], ready_s: float,
                  prefills: dict[str, int]) -> dict[str, Any]:
    return {**dataclasses.asdict(topology), "ready_s": round(ready_s, 2),
            "workers": [dataclasses.asdict(w) for w in workers], "prefills": prefills}


def _summary_json(s: RunSummary) -> dict[str, Any]:
    return {"completed": s.completed, "failed": s.failed, "errors": s.errors, "duration": s.duration,
            "request_throughput": s.request_throughput, "output_throughput": s.output_throughput,
            "goodput": s.goodput, "ttft_p50_ms": s.ttft.p50, "ttft_p99_ms": s.ttft.p99,
            "tpot_p50_ms": s.tpot.p50, "tpot_p99_ms": s.tpot.p99}


def comparison_json(cfg: TopologyConfig, runs: Sequence[TopologyRun], rows: Sequence[Row]) -> dict[str, Any]:
    names = [run.topology.name for run in runs]
    return {
        "schema": SCHEMA,
        "config": {"model": cfg.model, "gpus": list(cfg.gpus), "cpus": list(cfg.cpus),
                   "worker_args": list(cfg.worker_args), "router_args": list(cfg.router_args),
                   "serve": {k: v for k, v in runs[0].result.config.items() if k not in ("base_url", "topology")},
                   "slo": dataclasses.asdict(cfg.serve.slo)},
        "topologies": [{**run.result.config["topology"], "result": f"{run.topology.name}.json"} for run in runs],
        "rates": [{"load": {"kind": row.load.kind, "value": "inf" if math.isinf(row.load.value) else row.load.value},
                   **{name: _summary_json(s) for name, s in zip(names, row.summaries)},
                   "goodput_ratio": row.goodput_ratio} for row in rows],
    }


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# (heading, value, digits): one pair of columns each in the side-by-side table.
COLUMNS: tuple[tuple[str, Callable[[RunSummary], float | None], int], ...] = (
    ("TTFT p50 ms", lambda s: s.ttft.p50, 1), ("TTFT p99 ms", lambda s: s.ttft.p99, 1),
    ("TPOT p50 ms", lambda s: s.tpot.p50, 1), ("TPOT p99 ms", lambda s: s.tpot.p99, 1),
    ("req/s", lambda s: s.request_throughput, 2), ("goodput req/s", lambda s: s.goodput, 2))


def format_comparison(labels: Sequence[str], rows: Sequence[Row]) -> str:
    """Per rate, each metric for both topologies next to each other, then the goodput ratio."""
    width = max(8, *(len(label) for label in labels)) + 2
    ratio = f"{labels[0]}/{labels[1]}"
    lines = [_table_line("", [f"{title:^{width * len(labels)}}" for title, _, _ in COLUMNS],
                         f"{'goodput':^{len(ratio)}}"),
             _table_line("rate", ["".join(f"{label:>{width}}" for label in labels)] * len(COLUMNS), ratio)]
    for row in rows:
        groups = ["".join(f"{_num(get(s), digits):>{width}}" for s in row.summaries) for _, get, digits in COLUMNS]
        lines.append(_table_line(row.load.label(), groups, f"{_num(row.goodput_ratio, 2):>{len(ratio)}}"))
    return "\n".join(lines)


def _table_line(first: str, groups: Sequence[str], last: str) -> str:
    return (f"{first:>6} |" + "|".join(f"{group} " for group in groups) + f"| {last}").rstrip()


def write_report(cfg: TopologyConfig, runs: Sequence[TopologyRun]) -> list[Path]:
    """``comparison.json`` and the compare plots (each topology's JSON is written as it finishes)."""
    rows = comparison_rows([run.result for run in runs])
    path = cfg.output_dir / "comparison.json"
    path.write_text(json.dumps(comparison_json(cfg, runs, rows), indent=1))
    return [path, *write_plots([run.result for run in runs], cfg.output_dir)]


def write_result(cfg: TopologyConfig, run: TopologyRun) -> Path:
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.output_dir / f"{run.topology.name}.json"
    path.write_text(json.dumps(to_json(run.result), indent=1))
    return path


def notes(cfg: TopologyConfig) -> list[str]:
    """What the reader of the results should know about the setup."""
    found = []
    threshold = RouterConfig.local_prefill_threshold
    if cfg.serve.input_len[0] < threshold and not any("local-prefill-threshold" in a for a in cfg.router_args):
        found.append(f"note: prompts under {threshold} tokens prefill on the decode worker in 1P1D (the router's "
                     "--local-prefill-threshold; pass --router-args \"--local-prefill-threshold 0\" to disaggregate "
                     "every request)")
    if not cfg.serve.slo.any():
        found.append("note: no SLO given, so no goodput: pass --slo-ttft-ms and/or --slo-tpot-ms")
    return found


# The command.

@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so the running cluster is stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(cfg: TopologyConfig) -> list[TopologyRun]:
    runs = []
    for i, topology in enumerate(TOPOLOGIES):
        run_ = run_topology(cfg, topology, f"{i + 1}/{len(TOPOLOGIES)}")
        for result in run_.result.runs:
            print(progress_line(topology, result.summary, result.load), flush=True)
        where = ", ".join(f"{n} {w}" for w, n in run_.prefills.items()) or "not reported"
        print(f"{topology.label}: prompts prefilled {where}", flush=True)
        print(f"wrote {write_result(cfg, run_)}", flush=True)
        runs.append(run_)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args, frozenset(os.sched_getaffinity(0)), available_memory())
    except ValueError as err:
        print(f"pdserve bench topology: error: {err}", file=sys.stderr)
        return 2
    for line in notes(cfg):
        print(line, flush=True)
    try:
        with sigterm_interrupts():
            runs = run(cfg)
        paths = write_report(cfg, runs)
    except KeyboardInterrupt:
        print("pdserve bench topology: interrupted (clusters stopped)", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, TimeoutError, OSError, aiohttp.ClientError) as err:
        print(f"pdserve bench topology: {err}", file=sys.stderr)
        return 1
    print("wrote " + " ".join(str(p) for p in paths))
    print(format_comparison([run_.topology.label for run_ in runs], comparison_rows([r.result for r in runs])))
    return 0
