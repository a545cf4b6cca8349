"""Decode-shaped matmuls (a few rows times a weight) on the GPU: bytes/s per BLAS library.

Owns: the benchmark only. For each Llama-3-8B projection (bf16 weights, M = 1 or 8
rows) it times ``F.linear`` with torch's default BLAS library and with cuBLASLt
(``torch.backends.cuda.preferred_blas_library``), reporting weight GB/s against a
measured device-to-device copy. A decode step at batch 1 is these GEMVs plus small
kernels, so their speed bounds the batch-1 roofline ratio.

Run: ``python3 -m pdserve.bench.gemv`` (needs CUDA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def _copy_gbs() -> float:
    a = torch.empty(1 << 29, dtype=torch.uint16, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3) / 1e9


def _triton_sweep(copy: float) -> None:
    """Our GEMV (kernels/gemv.py) per shape at M = 1: the best of a few launch configs."""
    from pdserve.kernels.gemv import gemv

    configs = [(bn, bk, nw, 4) for bn in (4, 8, 16) for bk in (512, 1024) for nw in (4, 8)]
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        ref = F.linear(x, w)
        best = None
        for bn, bk, nw, ns in configs:
            fn = lambda: gemv(x, w, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)  # noqa: E731
            err = ((fn().float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < 1e-2, (name, bn, bk, err)
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            if best is None or ms < best[0]:
                best = (ms, bn, bk, nw, ns)
        ms, bn, bk, nw, ns = best
        gbs = w.numel() * 2 / (ms * 1e-3) / 1e9
        print(f"  triton    M=1 {name:8s} {ms * 1e3:7.1f} us = {gbs:6.0f} GB/s = {100 * gbs / copy:5.1f}% of copy "
              f"(block_n={bn} block_k={bk} warps={nw} stages={ns})")


def main() -> int:
    copy = _copy_gbs()
    print(f"{torch.cuda.get_device_name()}: copy {copy:,.0f} GB/s (read + write)")
    for lib in ("default", "cublaslt"):
        if lib != "default":
            torch.backends.cuda.preferred_blas_library(lib)
        for rows in (1, 8):
            total_bytes, total_ms = 0, 0.0
            for name, (n, k) in SHAPES.items():
                w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
                x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
                ms = triton.testing.do_bench(lambda: F.linear(x, w), warmup=25, rep=200, return_mode="median")
                total_bytes += w.numel() * 2
                total_ms += ms * (1 if name == "lm_head" else 32)
                print(f"  {lib:9s} M={rows} {name:8s} {ms * 1e3:7.1f} us = {w.numel() * 2 / (ms * 1e-3) / 1e9:6.0f} GB/s"
                      f" = {100 * w.numel() * 2 / (ms * 1e-3) / 1e9 / copy:5.1f}% of copy")
            print(f"  {lib:9s} M={rows} one step's projections (32 layers + LM head): {total_ms:.3f} ms")
    _triton_sweep(copy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
