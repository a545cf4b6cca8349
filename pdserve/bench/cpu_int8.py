"""W8A8 matmuls on the CPU: the int8 paths against bf16 and float32 ``F.linear``, in GFLOP/s.

Owns: the benchmark only. For SmolLM2-135M's projections (qkv, o, gate_up, down) and a
4096 x 4096 weight, at M = 1, 16, 64 and 256 rows, it times

- ``torch._int_mm`` (oneDNN; int32 out, no epilogue) on the [N, K] weight as stored,
- the compiled kernel: ``CpuKernels.int8_linear`` on the weight packed at load
  (``pack_int8_weight``), with the dequantizing epilogue, bfloat16 out (the AVX512-VNNI or AVX2
  GEMM where the build has it, else the slow portable loop the engine does not use),
- the whole W8A8 step the engine runs: ``quant_per_token`` of bf16 rows, then that kernel,
- ``F.linear`` in bfloat16 and in float32,

each as the median of repeated calls (the calls of one round are interleaved, so a
neighbour's load hits every path alike). Ratios are the compiled kernel's rate over
bf16's and float32's.

Run: ``python3 -m pdserve.bench.cpu_int8 [--rounds N] [--threads N]``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from pdserve.kernels.cpu import load_cpu_kernels

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "4096x4096": (4096, 4096)}  # name: (N, K)
ROWS = (1, 16, 64, 256)
PATHS = ("int_mm", "C", "C+quant", "bf16", "fp32")


def _time_once(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function; calls are batched to about 2 ms per sample,
    each sample after an untimed call (the path's weight back in cache: the paths' weights
    together can overflow the L3 and would otherwise favour whichever runs second)."""
    calls = {}
    for name, fn in fns.items():
        fn()
        calls[name] = max(1, int(2e-3 / max(_time_once(fn, 1), 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            samples[name].append(_time_once(fn, calls[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def _paths(kernels, n: int, k: int, m: int) -> dict[str, Callable[[], object]]:
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    weight_scale = torch.rand(n, 1) / 100
    packed = kernels.pack_int8_weight(weight)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    q, q_scale = kernels.quant_per_token(x)
    w_bf16 = torch.randn(n, k, dtype=torch.bfloat16)
    x32, w32 = x.float(), w_bf16.float()

    def w8a8_step():
        rows, scale = kernels.quant_per_token(x)
        return kernels.int8_linear(rows, scale, packed, weight_scale, None, torch.bfloat16)

    return {"int_mm": lambda: torch._int_mm(q, weight.t()),
            "C": lambda: kernels.int8_linear(q, q_scale, packed, weight_scale, None, torch.bfloat16),
            "C+quant": w8a8_step,
            "bf16": lambda: F.linear(x, w_bf16),
            "fp32": lambda: F.linear(x32, w32)}


def load_for_bench(threads: int | None):
    """The compiled kernels with ``threads`` torch threads (None: torch's), or None (said why)."""
    if threads:
        torch.set_num_threads(threads)
    kernels = load_cpu_kernels()
    if kernels is None:
        print("no C compiler: the CPU kernels are not built")
    return kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="samples per path (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    kernels = load_for_bench(args.threads)
    if kernels is None:
        return 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GFLOP/s (2*M*N*K / time), "
          f"median of {args.rounds} rounds; int_mm: int32 out, C: bf16 out with the epilogue")
    print(f"{'shape':>10} {'N':>5} {'K':>5} {'M':>4} " + " ".join(f"{p:>8}" for p in PATHS)
          + f" {'C/bf16':>7} {'C/fp32':>7}")
    for name, (n, k) in SHAPES.items():
        for m in ROWS:
            seconds = measure(_paths(kernels, n, k, m), args.rounds)
            rate = {p: 2 * m * n * k / seconds[p] / 1e9 for p in PATHS}
            print(f"{name:>10} {n:5d} {k:5d} {m:4d} " + " ".join(f"{rate[p]:8.1f}" for p in PATHS)
                  + f" {rate['C'] / rate['bf16']:6.2f}x {rate['C'] / rate['fp32']:6.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
