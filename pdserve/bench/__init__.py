"""Benchmarks (not tests): offline throughput, KV transfer bandwidth, kernels."""
