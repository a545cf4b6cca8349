"""Test-session setup shared by every test directory.

Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before
any test module imports ``kernels``: on a machine without CUDA the kernels then
run on the CPU interpreter.
"""
import os
import secrets


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One cluster secret for the session: every cluster a test starts (and its subprocesses)
# signs P/D orders and authenticates Worker RPCs with it; tests/services/clients.py
# sends its token on direct worker calls.
os.environ.setdefault("PDSERVE_CLUSTER_SECRET", "test-" + secrets.token_hex(16))
