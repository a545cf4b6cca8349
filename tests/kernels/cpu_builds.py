"""Builds of the compiled CPU kernels that kernel tests run against: native, and variants
without some instruction sets (``builds(variants)``), each None where it cannot be built;
``built(builds, name)`` skips a test whose build is missing. The CPU's feature flags too."""
from __future__ import annotations

import platform
from pathlib import Path

import pytest

from pdserve.kernels.cpu import CpuKernels, load_cpu_kernels

X86 = platform.machine().lower() in ("x86_64", "amd64")
CPU_FLAGS = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
# Compiler flags of the variant builds: plain C (no vector extensions the code tests for),
# and AVX2 + FMA without AVX-512 (on an AVX-512 CPU; on an AVX2-only CPU it equals native).
PORTABLE = ("-mno-avx512f", "-mno-avx2", "-mno-fma")
AVX2 = ("-mno-avx512f",)


def builds(variants: dict[str, tuple[str, ...]]) -> dict[str, CpuKernels | None]:
    native = load_cpu_kernels()
    return {"native": native, **{name: load_cpu_kernels(extra_flags=flags) if native is not None and X86 else None
                                 for name, flags in variants.items()}}


def built(all_builds: dict[str, CpuKernels | None], name: str) -> CpuKernels:
    kernels = all_builds[name]
    if kernels is None:
        pytest.skip(f"no {name} build of the CPU kernels here")
    return kernels
