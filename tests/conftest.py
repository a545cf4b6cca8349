"""Test-session setup shared by every test directory.

Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before
any test module imports ``kernels``: on a machine without CUDA the kernels then
run on the CPU interpreter.
"""
import os


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
