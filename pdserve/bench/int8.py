"""W8A8 projections on the GPU: our int8 GEMM against cuBLAS int8 and bf16.

Owns: the benchmark only. For each Llama-3-8B projection and M rows it times
``kernels.int8.int8_gemm`` (alone, and after ``quant_per_token`` of a bf16 x),
``torch._int_mm`` (cuBLASLt int8) followed by the scales in torch, bf16 ``F.linear``
and, at M = 1, our bf16 GEMV (``kernels.gemv``). Up to 64 rows it reports the weight
read rate against a measured device-to-device copy (decode is weight-bandwidth bound);
from 256 rows TFLOP/s (2*M*N*K per call). Weights rotate over copies that together
exceed the L2, so small shapes are read from device memory, as in a real decode step.
``--sweep`` then times candidate launch shapes (``Int8GemmConfig``) per shape and M.

Run: ``python3 -m pdserve.bench.int8 [--sweep]`` (needs CUDA).
"""
from __future__ import annotations

import argparse
import itertools
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

import torch
import torch.nn.functional as F
import triton

from pdserve.kernels.gemv import gemv
from pdserve.kernels.int8 import Int8GemmConfig, default_gemm_config, int8_gemm, k_splits, quant_per_token

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (1, 16, 64, 256, 2048, 8192)
DECODE_MAX_ROWS = 64
ROTATE_BYTES = 256 << 20  # weight copies per shape: together past 5x an H100's L2


def _copy_gbs() -> float:
    a = torch.empty(1 << 29, dtype=torch.uint16, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3) / 1e9


def _bench(fn: Callable[[], object]) -> float:
    """Median milliseconds per call."""
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


class Case:
    """One projection at M rows: rotating int8 and bf16 weight copies, activations, scales."""

    def __init__(self, n: int, k: int, m: int, bf16: bool = True) -> None:
        self.n, self.k, self.m = n, k, m
        copies = max(2, -(-ROTATE_BYTES // (n * k)))
        self.w = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda") for _ in range(copies)]
        self.w_scale = torch.rand(n, device="cuda") * 0.01 + 1e-3
        self.w16 = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
                    for _ in range(max(2, copies // 2))] if bf16 else []
        self.x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        self.q, self.q_scale = quant_per_token(self.x)
        self._i8 = itertools.cycle(self.w)
        self._i16 = itertools.cycle(self.w16)

    def int8(self, config: Int8GemmConfig | None = None, w: torch.Tensor | None = None) -> torch.Tensor:
        w = next(self._i8) if w is None else w
        return int8_gemm(self.q, self.q_scale, w, self.w_scale, config=config)

    def quant_int8(self) -> torch.Tensor:
        q, scale = quant_per_token(self.x)
        return int8_gemm(q, scale, next(self._i8), self.w_scale)

    def int_mm(self, w: torch.Tensor | None = None) -> torch.Tensor:
        # cuBLASLt int8 needs more than 16 rows: smaller M is padded to 17 (and timed so)
        w = next(self._i8) if w is None else w
        q = self.q if self.m > 16 else F.pad(self.q, (0, 0, 0, 17 - self.m))
        acc = torch._int_mm(q, w.t())
        scale = self.q_scale if self.m > 16 else F.pad(self.q_scale, (0, 0, 0, 17 - self.m))
        return (acc.float() * scale * self.w_scale).to(torch.bfloat16)

    def bf16(self) -> torch.Tensor:
        return F.linear(self.x, next(self._i16))

    def gemv(self) -> torch.Tensor:
        return gemv(self.x, next(self._i16))


def _rate(case: Case, ms: float, copy: float) -> str:
    if case.m <= DECODE_MAX_ROWS:
        gbs = case.n * case.k / (ms * 1e-3) / 1e9
        return f"{gbs:6.0f} GB/s {100 * gbs / copy:5.1f}%"
    return f"{2 * case.m * case.n * case.k / (ms * 1e-3) / 1e12:6.0f} TFLOP/s"


def _check(case: Case) -> None:
    ref = case.int_mm(case.w[0])[: case.m].float()
    got = case.int8(w=case.w[0]).float()
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"int8_gemm differs from torch._int_mm: {err:.2e}"


def table(copy: float) -> None:
    print(f"{'shape':8s} {'M':>5s} | {'int8_gemm':>9s} {'rate':>20s} | {'+quant':>8s} | {'_int_mm+epi':>11s} | "
          f"{'bf16':>8s} {'rate':>20s} | {'int8/bf16':>9s} | config")
    for name, (n, k) in SHAPES.items():
        for m in ROWS:
            case = Case(n, k, m)
            _check(case)
            t_int8 = _bench(case.int8)
            t_quant = _bench(case.quant_int8)
            t_mm = _bench(case.int_mm)
            t_bf16 = _bench(case.bf16)
            cfg = default_gemm_config(m, n, k, case.x.device)
            extra = ""
            if m == 1:
                t_gemv = _bench(case.gemv)
                gemv_pct = 100 * 2 * n * k / (t_gemv * 1e-3) / 1e9 / copy
                extra = f"  (bf16 gemv {t_gemv * 1e3:.1f} us = {gemv_pct:.1f}% of copy)"
            # the bf16 rate counts its 2-byte weight, so GB/s compare as bytes moved
            bf16_rate = _rate(case, t_bf16 / 2, copy) if m <= DECODE_MAX_ROWS else _rate(case, t_bf16, copy)
            print(f"{name:8s} {m:5d} | {t_int8 * 1e3:7.1f}us {_rate(case, t_int8, copy):>20s} | "
                  f"{t_quant * 1e3:6.1f}us | {t_mm * 1e3:9.1f}us | {t_bf16 * 1e3:6.1f}us {bf16_rate:>20s} | "
                  f"{t_bf16 / t_int8:8.2f}x | {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} "
                  f"s{cfg.num_stages} split{cfg.split_k}{' tma' if cfg.tma else ''}{extra}", flush=True)
            del case
            torch.cuda.empty_cache()


# the sweep's candidates (split_k 0: chosen from the shape, as the defaults do)
DECODE_CONFIGS = [
    Int8GemmConfig(16, bn, bk, group_m=1, split_k=s, num_warps=4, num_stages=st)
    for bn, bk, st, s in [(16, 512, 4, 1), (32, 512, 4, 1), (16, 1024, 3, 1), (16, 512, 4, 0), (32, 512, 4, 0),
                          (64, 256, 4, 0)]
]
DECODE64_CONFIGS = [
    Int8GemmConfig(64, bn, bk, group_m=1, split_k=s, num_warps=4, num_stages=st)
    for bn, bk, st, s in [(64, 256, 3, 0), (32, 256, 3, 0), (128, 128, 3, 0), (64, 128, 4, 0), (64, 256, 3, 1)]
]
PREFILL_CONFIGS = [
    Int8GemmConfig(bm, bn, bk, group_m=8, num_warps=w, num_stages=st, tma=tma)
    for bm, bn, bk, w, st, tma in [
        (128, 256, 128, 8, 3, True), (128, 256, 128, 8, 4, True), (256, 128, 128, 8, 3, True),
        (128, 128, 128, 8, 4, True), (64, 128, 128, 4, 4, True),
        (128, 256, 128, 8, 3, False), (128, 128, 128, 8, 4, False), (64, 128, 128, 4, 4, False)]
]
SWEEP_BUCKETS = [(1, DECODE_CONFIGS), (64, DECODE64_CONFIGS), (256, PREFILL_CONFIGS), (2048, PREFILL_CONFIGS)]


def compile_all(with_sweep: bool) -> None:
    """Compile every GEMM variant the run will time, in parallel processes (Triton's disk
    cache serves them after): one job per config, M == 1 (specialised), K slices or not."""
    dev = torch.device("cuda")
    todo = [(m, n, k, default_gemm_config(m, n, k, dev)) for m in ROWS for (n, k) in SHAPES.values()]
    if with_sweep:
        todo += [(m, n, k, cfg) for m, configs in SWEEP_BUCKETS for (n, k) in SHAPES.values() for cfg in configs]
    jobs = {(m == 1, cfg, k_splits(cfg, m, n, k, dev) > 1): (m, n, k, cfg) for m, n, k, cfg in todo}
    compile_in_parallel(_compile_one, list(jobs.values()))


def compile_in_parallel(compile_one: Callable[[Any], None], jobs: list[Any]) -> None:
    """``compile_one(job)`` for every job in up to 16 spawned processes (Triton's disk cache
    keeps what they compile); a crashed compiler stops it, and the run compiles the rest."""
    ctx = torch.multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(min(16, len(jobs)), mp_context=ctx) as pool:
            list(pool.map(compile_one, jobs))
    except BrokenProcessPool as exc:
        print(f"parallel compile stopped: {exc}", flush=True)


def _compile_one(job: tuple[int, int, int, Int8GemmConfig]) -> None:
    m, n, k, cfg = job
    q = torch.ones((m, k), dtype=torch.int8, device="cuda")
    w = torch.ones((n, k), dtype=torch.int8, device="cuda")
    try:
        int8_gemm(q, torch.ones(m, 1, device="cuda"), w, torch.ones(n, device="cuda"), config=cfg)
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - the sweep reports it
        pass


def sweep(copy: float) -> None:
    """Launch shapes per projection and M, fastest first, each checked against the default's output."""
    for m, configs in SWEEP_BUCKETS:
        for name, (n, k) in SHAPES.items():
            case = Case(n, k, m, bf16=False)
            expect = case.int8(w=case.w[0])
            results = []
            for cfg in configs:
                try:
                    assert torch.equal(case.int8(cfg, case.w[0]), expect), "differs from the default config"
                    results.append((_bench(lambda: case.int8(cfg)), cfg))
                except Exception as exc:  # noqa: BLE001 - a shape that does not compile is reported, not fatal
                    print(f"  {name} M={m} {cfg}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            results.sort(key=lambda r: r[0])
            line = ", ".join(f"{c.block_m}x{c.block_n}x{c.block_k}w{c.num_warps}s{c.num_stages}"
                             f"k{k_splits(c, m, n, k, case.x.device)}{'T' if c.tma else ''} "
                             f"{t * 1e3:.1f} ({_rate(case, t, copy).strip()})" for t, c in results)
            print(f"sweep {name:8s} M={m:5d} (us): {line}", flush=True)
            del case
            torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="then time launch shapes per shape and M")
    args = parser.parse_args()
    compile_all(args.sweep)
    copy = _copy_gbs()
    print(f"{torch.cuda.get_device_name()}: copy {copy:,.0f} GB/s (read + write); torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    table(copy)
    if args.sweep:
        sweep(copy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
