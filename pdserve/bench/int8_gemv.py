"""W8A8 decode GEMV on the GPU: ``int8_gemv``'s launch shapes against ``int8_gemm``, the bf16 GEMV and a copy.

Owns: the benchmark only. For each Llama-3-8B projection and M = 1, 2, 4 rows it times
``kernels.int8_gemv.int8_gemv`` at its default launch shape and over a sweep of launch
shapes (``--no-sweep`` skips it), ``kernels.int8.int8_gemm`` at its default, the bf16
GEMV (``kernels.gemv``, M = 1) on a bf16 weight of the same shape, and a device-to-device
copy of as many bytes as the int8 weight (the bandwidth ceiling). Every launch shape is
first checked to give ``int8_gemm``'s output bit for bit; a mismatch stops the run.

Timing: a CUDA graph of 20 calls, replayed after warm-ups, each replay timed with CUDA
events; the median per call. The 20 calls rotate over weight copies that together hold at
least 256 MB (5x an H100's L2), so a weight is read from device memory, not from L2; the
L2 is not flushed otherwise. GB/s counts the weight bytes read (the copy: read + written);
"% copy" is that rate over the copy's rate for the same shape.

Prints a table per shape and M, the best launch shape per (shape, M), and one JSON line
(``int8_gemv_best``) from which ``default_gemv_config`` can be set.

Run: ``python3 -m pdserve.bench.int8_gemv [--no-sweep] [--top N] [--stages 3]`` (needs CUDA).
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, replace
from typing import Callable, Iterator

import torch
import triton

from pdserve.kernels.gemv import gemv
from pdserve.kernels.int8 import int8_gemm
from pdserve.bench.int8 import compile_in_parallel
from pdserve.kernels.int8_gemv import Int8GemvConfig, default_gemv_config, gemv_k_splits, int8_gemv

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (1, 2, 4)
ROTATE_BYTES = 256 << 20
GRAPH_CALLS = 20
WARMUP_REPLAYS = 3
TIMED_REPLAYS = 15
# the sweep's axes, pruned in ``sweep_configs``
BLOCK_N = (4, 8, 16, 32)
BLOCK_K = (256, 512, 1024, 2048)
WARPS = (2, 4, 8)
SPLITS = (1, 2, 4)
MAX_ACC_REGS = 128  # int32 accumulator registers per thread
MIN_LOAD_WORDS = 4  # weight words per thread per step: one 16-byte load


def time_calls(calls: list[Callable[[], object]]) -> float:
    """Median microseconds per call: ``calls`` captured once in a CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(WARMUP_REPLAYS):
        graph.replay()
    times = []
    for _ in range(TIMED_REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


class Shape:
    """One projection: rotating int8 weight copies (and copy targets, bf16 copies), scales."""

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k = n, k
        copies = min(GRAPH_CALLS, max(2, -(-ROTATE_BYTES // (n * k))))
        self.w = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda") for _ in range(copies)]
        self.w_scale = torch.rand(n, device="cuda") * 0.01 + 1e-3
        self._dst = [torch.empty_like(w) for w in self.w]
        self._w16: list[torch.Tensor] = []

    def rotation(self) -> list[torch.Tensor]:
        return [self.w[i % len(self.w)] for i in range(GRAPH_CALLS)]

    def copy_us(self) -> float:
        pairs = [(self._dst[i % len(self.w)], self.w[i % len(self.w)]) for i in range(GRAPH_CALLS)]
        return time_calls([lambda d=d, s=s: d.copy_(s) for d, s in pairs])

    def bf16_gemv_us(self, x: torch.Tensor) -> float:
        if not self._w16:
            copies = min(GRAPH_CALLS, max(2, -(-ROTATE_BYTES // (2 * self.n * self.k))))
            self._w16 = [torch.randn(self.n, self.k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
        ws = [self._w16[i % len(self._w16)] for i in range(GRAPH_CALLS)]
        return time_calls([lambda w=w: gemv(x, w) for w in ws])


class Rows:
    """M activation rows for one shape, and the calls to time on them."""

    def __init__(self, shape: Shape, m: int) -> None:
        self.shape, self.m = shape, m
        self.q = torch.randint(-127, 128, (m, shape.k), dtype=torch.int8, device="cuda")
        self.q_scale = torch.rand(m, 1, device="cuda") * 0.01 + 1e-4
        self.x16 = torch.randn(m, shape.k, dtype=torch.bfloat16, device="cuda")

    def gemv(self, w: torch.Tensor, cfg: Int8GemvConfig | None) -> torch.Tensor:
        args = {} if cfg is None else asdict(cfg)
        return int8_gemv(self.q, self.q_scale, w, self.shape.w_scale, None, torch.bfloat16, **args)

    def gemm(self, w: torch.Tensor) -> torch.Tensor:
        return int8_gemm(self.q, self.q_scale, w, self.shape.w_scale, None, torch.bfloat16)

    def gemv_us(self, cfg: Int8GemvConfig | None) -> float:
        return time_calls([lambda w=w: self.gemv(w, cfg) for w in self.shape.rotation()])

    def gemm_us(self) -> float:
        return time_calls([lambda w=w: self.gemm(w) for w in self.shape.rotation()])


def sweep_configs(m: int, n: int, k: int, stages: tuple[int, ...]) -> Iterator[Int8GemvConfig]:
    """The sweep's launch shapes for M rows of [N, K], pruned: at least one 16-byte weight
    load per thread and step, at most 128 accumulator registers per thread (M padded to a
    power of two), K slices only where the weight-row tiles number under two per
    multiprocessor, and no more slices than steps."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block_m = triton.next_power_of_2(m)
    for bn in BLOCK_N:
        for bk in BLOCK_K:
            for warps in WARPS:
                threads = 32 * warps
                words = bn * bk // 4
                if words < MIN_LOAD_WORDS * threads or block_m * words > MAX_ACC_REGS * threads:
                    continue
                for split in SPLITS:
                    if split > 1 and (triton.cdiv(n, bn) >= 2 * sms or split > triton.cdiv(k, bk)):
                        continue
                    for st in stages:
                        yield Int8GemvConfig(block_n=bn, block_k=bk, num_warps=warps, num_stages=st, split_k=split)


def _label(cfg: Int8GemvConfig, n: int, k: int) -> str:
    split = gemv_k_splits(cfg, n, k, torch.device("cuda"))
    return f"n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} split{split}"


def compile_all(jobs: list[tuple[int, int, int, Int8GemvConfig]]) -> None:
    """Compile every launch shape the run will time in parallel processes (Triton's disk
    cache serves them after): one job per kernel variant (rows, shape, K slices or not)."""
    dev = torch.device("cuda")
    unique = {(m, replace(cfg, split_k=0), gemv_k_splits(cfg, n, k, dev) > 1): (m, n, k, cfg)
              for m, n, k, cfg in jobs}
    compile_in_parallel(_compile_one, list(unique.values()))


def _compile_one(job: tuple[int, int, int, Int8GemvConfig]) -> None:
    m, n, k, cfg = job
    q = torch.zeros((m, k), dtype=torch.int8, device="cuda")
    w = torch.zeros((n, k), dtype=torch.int8, device="cuda")
    try:
        int8_gemv(q, torch.ones(m, 1, device="cuda"), w, torch.ones(n, device="cuda"), None, torch.bfloat16,
                  **asdict(cfg))
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - the timed run reports it
        pass


def _row(name: str, m: int, what: str, us: float, nbytes: int, copy_gbs: float) -> str:
    gbs = nbytes / (us * 1e-6) / 1e9
    return f"{name:8s} {m:2d}  {what:42s} {us:9.1f} {gbs:8.0f} {100 * gbs / copy_gbs:7.1f}%"


def run_shape(name: str, n: int, k: int, sweep: bool, top: int, stages: tuple[int, ...]) -> dict:
    """Times one projection at every M; returns {M: best result} (the default config counts)."""
    shape = Shape(n, k)
    copy_us = shape.copy_us()
    copy_gbs = 2 * n * k / (copy_us * 1e-6) / 1e9
    best: dict = {}
    for m in ROWS:
        rows = Rows(shape, m)
        expect = rows.gemm(shape.w[0])
        print(_row(name, m, f"copy {n * k >> 20} MiB (read + write)", copy_us, 2 * n * k, copy_gbs))
        gemm_us = rows.gemm_us()
        print(_row(name, m, "int8_gemm default", gemm_us, n * k, copy_gbs))
        if m == 1:
            print(_row(name, m, "bf16 gemv (2-byte weight)", shape.bf16_gemv_us(rows.x16[:1]), 2 * n * k, copy_gbs))
        default = default_gemv_config(m, n, k, torch.device("cuda"))
        _verify(rows, default, expect, name)
        default_us = rows.gemv_us(None)
        print(_row(name, m, f"int8_gemv default {_label(default, n, k)}", default_us, n * k, copy_gbs), flush=True)
        results = [(default_us, default)]
        if sweep:
            for cfg in sweep_configs(m, n, k, stages):
                if _label(cfg, n, k) == _label(default, n, k):
                    continue  # the default, timed above
                _verify(rows, cfg, expect, name)
                results.append((rows.gemv_us(cfg), cfg))
            results.sort(key=lambda r: r[0])
            for us, cfg in results[:top]:
                tag = " (default)" if cfg is default else ""
                print(_row(name, m, f"  sweep {_label(cfg, n, k)}{tag}", us, n * k, copy_gbs))
        us, cfg = min(results, key=lambda r: r[0])
        best[m] = dict(config=asdict(cfg), splits=gemv_k_splits(cfg, n, k, torch.device("cuda")), us=round(us, 2),
                       pct_copy=round(100 * (n * k / us) / (2 * n * k / copy_us), 1),
                       default_us=round(default_us, 2), int8_gemm_us=round(gemm_us, 2))
        print(flush=True)
    del shape
    torch.cuda.empty_cache()
    return best


def _verify(rows: Rows, cfg: Int8GemvConfig, expect: torch.Tensor, name: str) -> None:
    got = rows.gemv(rows.shape.w[0], cfg)
    if not torch.equal(got, expect):
        diff = (got.float() - expect.float()).abs().max().item()
        raise SystemExit(f"int8_gemv {cfg} differs from int8_gemm at {name} "
                         f"[{rows.shape.n}, {rows.shape.k}] M={rows.m}: max |diff| {diff:g}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="default launch shapes only")
    parser.add_argument("--top", type=int, default=8, help="sweep rows printed per shape and M (fastest first)")
    parser.add_argument("--stages", type=int, nargs="+", default=[Int8GemvConfig().num_stages],
                        help="num_stages values to sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    stages = tuple(args.stages)
    dev = torch.device("cuda")
    jobs = [(m, n, k, default_gemv_config(m, n, k, dev)) for (n, k) in SHAPES.values() for m in ROWS]
    if args.sweep:
        jobs += [(m, n, k, cfg) for (n, k) in SHAPES.values() for m in ROWS for cfg in sweep_configs(m, n, k, stages)]
    compile_all(jobs)
    print(f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs; "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"timing: CUDA graphs of {GRAPH_CALLS} calls over >= {ROTATE_BYTES >> 20} MB of rotating weight copies "
          f"(no L2 flush), median of {TIMED_REPLAYS} replays; GB/s = weight bytes read (copy: read + written)")
    print(f"{'shape':8s} {'M':>2s}  {'what':42s} {'us':>9s} {'GB/s':>8s} {'% copy':>8s}", flush=True)
    best = {name: run_shape(name, n, k, args.sweep, args.top, stages) for name, (n, k) in SHAPES.items()}
    print("best int8_gemv launch shape per (shape, M):")
    for name, per_m in best.items():
        for m, r in per_m.items():
            c = r["config"]
            print(f"  {name:8s} M={m}: n{c['block_n']} k{c['block_k']} w{c['num_warps']} s{c['num_stages']} "
                  f"split{r['splits']}  {r['us']:.1f} us = {r['pct_copy']:.1f}% of copy; "
                  f"default {r['default_us']:.1f} us, int8_gemm {r['int8_gemm_us']:.1f} us "
                  f"({r['int8_gemm_us'] / r['us']:.2f}x)")
    print(json.dumps({"int8_gemv_best": best, "device": torch.cuda.get_device_name(),
                      "triton": triton.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
