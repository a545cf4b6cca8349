"""Decode-shaped matmuls (a few rows times a weight) on the GPU: bytes/s per BLAS library.

Owns: the benchmark only. For each Llama-3-8B projection (bf16 weights, M = 1 or 8
rows) it times ``F.linear`` with torch's default BLAS library and with cuBLASLt
(``torch.backends.cuda.preferred_blas_library``), reporting weight GB/s against a
measured device-to-device copy. A decode step at batch 1 is these GEMVs plus small
kernels, so their speed bounds the batch-1 roofline ratio.

Run: ``python3 -m bench.gemv`` (needs CUDA).
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
