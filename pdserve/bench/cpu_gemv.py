"""Float linear layers on the CPU: the compiled GEMM over packed weights against ``F.linear``.

Owns: the benchmark only. For SmolLM2-135M's projections (qkv, o, gate_up, down, the tied
LM head) and a 4096 x 4096 weight, at M = 1, 4, 16 and 64 rows (``--rows``), in bfloat16 and
float32, it times

- ``CpuKernels.linear`` on the weight packed at load (``pack_linear_weight``),
- ``F.linear`` on the [N, K] weight as stored,

each as the median of repeated calls, the calls of one round interleaved (a neighbour's
load hits both paths alike). Reported: microseconds per call, the weight's bytes over that
time (GB/s: at small M a linear layer streams its weight, so this is the figure to hold
against the memory bandwidth) and the ratio of the two times. Each shape gets fresh weights
per path, read once untimed before each sample, as the engine reads every layer's weight
once per step (the LM head's 56 MB overflow any cache; the small ones may be served from
L3 here, which a whole model's 270 MB cannot be).

Run: ``python3 -m pdserve.bench.cpu_gemv [--rounds N] [--threads N] [--rows 1,4,16,64]``.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F

from pdserve.bench.cpu_int8 import load_for_bench, measure

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "lm_head": (49152, 576), "4096x4096": (4096, 4096)}  # name: (N, K)
ROWS = (1, 4, 16, 64)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _paths(kernels, n: int, k: int, m: int, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    weight = torch.randn(n, k, dtype=dtype)
    packed = kernels.pack_linear_weight(torch.randn(n, k, dtype=dtype))
    x = torch.randn(m, k, dtype=dtype)
    return {"C": lambda: kernels.linear(x, packed), "F.linear": lambda: F.linear(x, weight)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="samples per path (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="M values, comma-separated")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="bf16,fp32")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=",".join(SHAPES))
    args = parser.parse_args(argv)
    kernels = load_for_bench(args.threads)
    if kernels is None:
        return 1
    vec = ", ".join(sorted(str(t).removeprefix("torch.") for t in kernels.linear_vec)) or "none"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; vectorized: {vec}; "
          f"median of {args.rounds} rounds; GB/s = weight bytes / time")
    print(f"{'dtype':>5} {'shape':>10} {'N':>5} {'K':>5} {'M':>4} {'C us':>9} {'C GB/s':>7} "
          f"{'F us':>9} {'F GB/s':>7} {'F/C':>6}")
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for name in args.shapes.split(","):
            n, k = SHAPES[name]
            for m in (int(r) for r in args.rows.split(",")):
                seconds = measure(_paths(kernels, n, k, m, dtype), args.rounds)
                c, f = seconds["C"], seconds["F.linear"]
                gb = n * k * dtype.itemsize / 1e9
                print(f"{dname:>5} {name:>10} {n:5d} {k:5d} {m:4d} {c * 1e6:9.1f} {gb / c:7.1f} "
                      f"{f * 1e6:9.1f} {gb / f:7.1f} {f / c:5.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
