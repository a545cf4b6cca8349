"""Kernel benchmark: paged attention against the device's copy bandwidth and matmul-free roofline.

Owns: timing of ``kernels.attention`` on a CUDA device (Llama-3-8B attention shape:
32 query heads, 8 KV heads, head_dim 128, bf16, block size 16).

- decode: batch 64 x context 4096, one query each; reports KV bytes read per
  second against a measured device-to-device copy (bytes read + written per second).
- prefill: fresh prompts and prefix-cached chunks; reports attention TFLOP/s
  (causal pairs only) next to torch's fused SDPA on contiguous tensors.

Run: ``python3 -m pdserve.bench.kernels [--sweep]``; ``--sweep`` also times launch shapes.
Times are medians of ``triton.testing.do_bench`` (L2 flushed between runs).
"""
from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass

import torch
import triton

from pdserve.kernels.attention import (DecodeConfig, PrefillConfig, paged_decode_attention,
                               paged_prefill_attention)

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16


@dataclass
class PagedBatch:
    q: torch.Tensor
    kv_layer: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_seq_len: int

    def args(self) -> tuple:
        return (self.q, self.kv_layer, self.query_start_loc, self.seq_lens, self.block_tables,
                HEAD_DIM ** -0.5)


def make_batch(q_lens: list[int], seq_lens: list[int]) -> PagedBatch:
    """Random q and KV, each sequence's blocks scattered through the cache."""
    blocks = [math.ceil(s / BLOCK_SIZE) for s in seq_lens]
    kv_layer = torch.randn(sum(blocks), 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    perm = torch.randperm(sum(blocks), device="cuda").to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device="cuda")
    start = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = perm[start:start + n]
        start += n
    qsl = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(sum(q_lens), Q_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    return PagedBatch(q, kv_layer, qsl, torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
                      tables, max(seq_lens))


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.randn(1 << 29, dtype=DTYPE, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def kv_bytes(batch: PagedBatch) -> int:
    return int(batch.seq_lens.sum()) * 2 * KV_HEADS * HEAD_DIM * batch.kv_layer.element_size()


def time_decode(batch: PagedBatch, cfg: DecodeConfig | None) -> float:
    out = torch.empty_like(batch.q)
    return median_ms(lambda: paged_decode_attention(*batch.args(), batch.max_seq_len, out=out, config=cfg))


def time_prefill(batch: PagedBatch, cfg: PrefillConfig | None) -> float:
    out = torch.empty_like(batch.q)
    return median_ms(lambda: paged_prefill_attention(*batch.args(), out=out, config=cfg))


def causal_flops(q_lens: list[int], seq_lens: list[int]) -> float:
    """4 * heads * head_dim per (query, visible key) pair: QK^T and PV."""
    pairs = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(q_lens, seq_lens))
    return 4.0 * Q_HEADS * HEAD_DIM * pairs


def sdpa_ms(q_lens: list[int], seq_lens: list[int]) -> float | None:
    """torch SDPA on contiguous [B, H, L, D] tensors, for equal-length fresh prompts only."""
    if len(set(q_lens)) != 1 or q_lens != seq_lens:
        return None
    b, n = len(q_lens), q_lens[0]
    q = torch.randn(b, Q_HEADS, n, HEAD_DIM, dtype=DTYPE, device="cuda")
    k, v = (torch.randn(b, KV_HEADS, n, HEAD_DIM, dtype=DTYPE, device="cuda") for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return median_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True))


def sweep_decode(copy_bw: float) -> None:
    """Split counts per batch size at context 4096 (KV GB/s as % of copy)."""
    print("\ndecode split sweep (ctx 4096): batch splits -> us, % of copy")
    for batch_size in (4, 16, 32, 64):
        batch = make_batch([1] * batch_size, [4096] * batch_size)
        for splits in (None, 1, 2, 4, 8, 16):
            ms = time_decode(batch, DecodeConfig(block_n=64, num_warps=4, num_stages=3, num_splits=splits))
            pct = 100 * kv_bytes(batch) / (ms * 1e-3) / copy_bw
            print(f"  {batch_size:3d} {str(splits or 'auto'):>5s} -> {ms * 1e3:7.1f} us {pct:5.1f}%")


def sweep_prefill(batch: PagedBatch) -> None:
    print("\nprefill sweep: block_m block_n warps stages -> ms")
    for block_m, block_n, warps, stages in itertools.product((64, 128), (32, 64), (4, 8), (2, 3)):
        cfg = PrefillConfig(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            print(f"  {block_m:4d} {block_n:4d} {warps:2d} {stages:2d} -> {time_prefill(batch, cfg):.3f}")
        except Exception as exc:
            print(f"  {block_m:4d} {block_n:4d} {warps:2d} {stages:2d} -> failed: {type(exc).__name__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time alternative launch shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("pdserve.bench.kernels needs a CUDA device")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e9:,.0f} GB/s (read + write)")

    decode = make_batch([1] * 64, [4096] * 64)
    ms = time_decode(decode, None)
    bw = kv_bytes(decode) / (ms * 1e-3)
    print(f"decode  B=64 ctx=4096: {ms * 1e3:8.1f} us  KV {kv_bytes(decode) / 1e9:.3f} GB  "
          f"{bw / 1e9:,.0f} GB/s = {100 * bw / copy_bw:.1f}% of copy")
    ragged_lens = torch.randint(256, 8192, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    ragged = make_batch([1] * 64, ragged_lens)
    ms = time_decode(ragged, None)
    bw = kv_bytes(ragged) / (ms * 1e-3)
    print(f"decode  B=64 ctx=256..8191 ragged: {ms * 1e3:8.1f} us  {bw / 1e9:,.0f} GB/s = "
          f"{100 * bw / copy_bw:.1f}% of copy")

    cases = {"fresh 4x4096": ([4096] * 4, [4096] * 4),
             "chunk 8x512 after 3584 cached": ([512] * 8, [4096] * 8)}
    prefill_batches = {}
    for name, (q_lens, seq_lens) in cases.items():
        batch = prefill_batches[name] = make_batch(q_lens, seq_lens)
        ms = time_prefill(batch, None)
        tflops = causal_flops(q_lens, seq_lens) / (ms * 1e-3) / 1e12
        line = f"prefill {name}: {ms * 1e3:8.1f} us  {tflops:6.1f} TFLOP/s"
        ref = sdpa_ms(q_lens, seq_lens)
        if ref is not None:
            line += f"  (torch SDPA contiguous: {causal_flops(q_lens, seq_lens) / (ref * 1e-3) / 1e12:.1f} TFLOP/s)"
        print(line)

    if args.sweep:
        sweep_decode(copy_bw)
        sweep_prefill(prefill_batches["fresh 4x4096"])


if __name__ == "__main__":
    main()
