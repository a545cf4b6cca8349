"""W8A8 decode GEMV: 1-4 int8 activation rows times an int8 weight, on the CUDA cores.

Owns: ``int8_gemv`` (the same product, scales, bias and output rounding as
``int8.int8_gemm``, for M <= 4 rows), its launch shape ``Int8GemvConfig`` /
``default_gemv_config`` and ``gemv_k_splits``. Stateless; no call reads device data on
the host or waits for the device, so it can be captured in a CUDA graph.

Why: a decode step with 1-4 rows only streams the weight, N*K bytes for 2*M*N*K integer
operations. ``int8_gemm`` pads the rows to a 16-row tensor-core tile (at M = 1, 16x the
needed multiply-adds); a GEMV that unpacks the bytes and multiplies them one by one in
int32 is bound by those instructions instead of by memory. Here each 32-bit word of the
weight holds four int8 values, and the PTX ``dp4a.s32.s32`` instruction multiplies two
such words byte by byte and adds the four products to an int32 in one instruction, so a
word of weight costs one instruction per activation row. Measured on an H100 (Triton 3.6,
``python3 -m pdserve.bench.int8_gemv``) over Llama-3-8B's projections at the defaults:
83-99% of copy bandwidth at M = 1-2, where ``int8_gemm`` reads at 72-90% (1.09-1.15x
faster); 76-89% at M = 4, about ``int8_gemm``'s speed (0.99-1.07x).

Layout: both operands are read as int32 words (``tensor.view(torch.int32)``: [N, K/4] and
[M, K/4]; needs K % 4 == 0 and 4-byte aligned rows). A program owns ``block_n`` weight
rows and every activation row (padded to a power of two, ``BLOCK_M``), and walks its K
range ``block_k`` bytes at a time. The accumulator is one int32 per (row, weight row,
word of the step): [BLOCK_M, block_n, block_k / 4], each element a chain of dp4a over
the steps, summed over its last axis once at the end. So the loop has no reduction
across threads, and a loaded weight word feeds all M rows from registers. ``split_k``
cuts K into slices; each slice stores its int32 sums and ``int8._sum_splits_kernel`` adds
them (for shapes with too few weight-row tiles to occupy every multiprocessor).

Paths (a constexpr switch, chosen on the host from the tensors alone): dp4a on CUDA
devices; under Triton's CPU interpreter (which cannot run inline PTX) the same words
unpacked with shifts and multiplied in int32; where K % 4 != 0 or a row is not 4-byte
aligned, the int8 values loaded one by one and multiplied in int32 (a step then covers
``block_k / 4`` bytes, so the accumulator keeps its size).

Numerics: every path sums exactly in int32 (|sum| <= 128 * 128 * K < 2**31 for K < 131072,
as in ``int8_gemm``), then the epilogue shared with ``int8_gemm`` (``int8._epilogue``)
computes float32 acc * q_scale[m] * weight_scale[n] (+ bias[n]) and rounds once to
out_dtype, so the output equals ``int8_gemm``'s bit for bit and ``reference.int8_linear_ref``
up to the float32 epilogue.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# NOTE: the epilogue and the slice-summing kernel are int8_gemm's own, so both ops round
# identically; they are private there, shared on purpose.
from pdserve.kernels.int8 import (_epilogue, _multiprocessors, _rows_contiguous, _sum_splits_kernel,
                                  check_gemm_args, out_buffer)

MAX_ROWS = 4
_WORD = 4  # int8 values per 32-bit word


@dataclass(frozen=True)
class Int8GemvConfig:
    """Launch shape of ``int8_gemv``.

    ``block_n`` weight rows per program (a power of two); ``block_k`` bytes of K per loop
    step (a power of two, at least 4); ``split_k`` slices of K (0: from the shape, see
    ``_auto_split``), capped at one per step.
    """

    block_n: int = 4
    block_k: int = 2048
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0


def default_gemv_config(m: int, n: int, k: int, device: torch.device) -> Int8GemvConfig:
    """The launch shape for M rows of an [N, K] weight.

    Narrow tiles (4 weight rows per program: many programs, each streaming whole rows)
    and long steps; half as long at 3-4 rows, where the accumulator is twice as big
    (BLOCK_M * block_n * block_k / 4 int32 values over 128 threads: 32 registers each).
    NOTE: chosen from ``python3 -m pdserve.bench.int8_gemv``'s sweep on an H100 over
    Llama-3-8B's projections: within 4% of each shape's best at M <= 2, 8% at M = 4
    (where 2 warps or 512-byte steps won on some shapes); wider tiles gained at most 1%
    anywhere, and K slices were never among the fastest there. Off the GPU (the Triton
    interpreter, whose cost is per program and per operation, not per byte) 64 rows.
    """
    block_k = 2048 if _block_m(m) <= 2 else 1024
    block_n = 4 if device.type == "cuda" else 64
    return Int8GemvConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=3, split_k=0)


def gemv_k_splits(cfg: Int8GemvConfig, n: int, k: int, device: torch.device, packed: bool = True) -> int:
    """The number of K slices ``int8_gemv`` runs ``cfg`` with for an [N, K] weight
    (``packed``: K % 4 == 0 and aligned rows, the dp4a path's word units)."""
    units = k // _WORD if packed else k
    return _k_slices(cfg, n, units, device)[0]


def int8_gemv(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
              out: torch.Tensor | None = None, block_n: int | None = None, block_k: int | None = None,
              num_warps: int | None = None, num_stages: int | None = None,
              split_k: int | None = None) -> torch.Tensor:
    """(q [M, K] int8 @ weight [N, K] int8 .T) * q_scale [M, 1] * weight_scale [N] (+ bias [N]) -> [M, N].

    ``int8_gemm``'s contract for M <= 4 (M == 0 gives the empty output): q_scale and
    weight_scale float32 (weight_scale may be [N, 1]), bias any float dtype, out_dtype
    float32, bfloat16 or float16. Launch arguments left ``None`` come from
    ``default_gemv_config``.
    """
    m, n, k = _check_args(q, q_scale, weight, weight_scale, bias)
    out = out_buffer(out, m, n, out_dtype, q.device)
    if m == 0 or n == 0:
        return out
    base = default_gemv_config(m, n, k, q.device)
    cfg = Int8GemvConfig(
        block_n=base.block_n if block_n is None else block_n, block_k=base.block_k if block_k is None else block_k,
        num_warps=base.num_warps if num_warps is None else num_warps,
        num_stages=base.num_stages if num_stages is None else num_stages,
        split_k=base.split_k if split_k is None else split_k,
    )
    _check_config(cfg)
    _launch(q, q_scale, weight, weight_scale, bias, out, cfg)
    return out


# ---- host helpers ---------------------------------------------------------------------

def _check_args(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[int, int, int]:
    if q.dim() == 2 and q.shape[0] > MAX_ROWS:
        raise ValueError(f"int8_gemv takes at most {MAX_ROWS} rows, got M = {q.shape[0]} (int8_gemm takes any)")
    return check_gemm_args(q, q_scale, weight, weight_scale, bias)


def _check_config(cfg: Int8GemvConfig) -> None:
    def pow2(v: int) -> bool:
        return v > 0 and v & (v - 1) == 0

    if not pow2(cfg.block_n) or not pow2(cfg.block_k) or cfg.block_k < _WORD:
        raise ValueError(f"block_n and block_k must be powers of two (block_k >= {_WORD}), got {cfg}")
    if not pow2(cfg.num_warps) or cfg.num_stages < 1 or cfg.split_k < 0:
        raise ValueError(f"bad launch arguments: {cfg}")


def _launch(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
            bias: torch.Tensor | None, out: torch.Tensor, cfg: Int8GemvConfig) -> None:
    m, k = q.shape
    n = weight.shape[0]
    q, weight = _rows_contiguous(q), _rows_contiguous(weight)
    packed = _packable(q) and _packable(weight)
    if packed:
        q, weight = q.view(torch.int32), weight.view(torch.int32)
    units = k // _WORD if packed else k
    q_scale = q_scale.reshape(-1).to(torch.float32).contiguous()
    weight_scale = weight_scale.reshape(-1).to(torch.float32).contiguous()
    bias = None if bias is None else bias.reshape(-1).contiguous()
    scales = (q_scale, weight_scale, bias if bias is not None else weight_scale)
    split, units_per_split = _k_slices(cfg, n, units, q.device)
    block_u = cfg.block_k // _WORD
    partial = out if split == 1 else torch.empty((split, m, n), dtype=torch.int32, device=q.device)
    _int8_gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
        q, weight, *scales, partial, m, n, units, units_per_split, q.stride(0), weight.stride(0),
        partial.stride(-2), partial.stride(0) if split > 1 else 0,
        BLOCK_M=_block_m(m), BLOCK_N=cfg.block_n, BLOCK_U=block_u, PACKED=packed,
        DP4A=packed and _dp4a_ok(q.device), HAS_BIAS=bias is not None, SPLIT=split > 1,
        EVEN_K=units % block_u == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        block_m = _block_m(m)
        _sum_splits_kernel[(1, triton.cdiv(n, 256))](
            partial, *scales, out, m, n, split, partial.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=256,
            HAS_BIAS=bias is not None, num_warps=4,
        )


def _block_m(m: int) -> int:
    return triton.next_power_of_2(max(1, m))


def _packable(t: torch.Tensor) -> bool:
    """Whether ``t.view(torch.int32)`` works: 4-byte aligned start, row stride and K."""
    if t.shape[1] == 0:
        return False
    return (t.shape[1] % _WORD == 0 and t.stride(1) == 1 and t.stride(0) % _WORD == 0
            and t.storage_offset() % _WORD == 0)


def _k_slices(cfg: Int8GemvConfig, n: int, units: int, device: torch.device) -> tuple[int, int]:
    """(slices, K units per slice): ``cfg.split_k`` (or the pick for 0), each slice a whole
    number of steps and none empty."""
    block_u = cfg.block_k // _WORD
    steps = triton.cdiv(units, block_u)
    split = cfg.split_k or _auto_split(triton.cdiv(n, cfg.block_n), steps, _multiprocessors(device))
    split = max(1, min(split, steps))
    per_split = triton.cdiv(steps, split) * block_u
    return (triton.cdiv(units, per_split) if units else 1), per_split


def _auto_split(tiles: int, steps: int, sms: int) -> int:
    """No split while the weight-row tiles alone reach every multiprocessor; else slices
    for about two programs per multiprocessor, each of at least two steps."""
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), steps // 2))


def _dp4a_ok(device: torch.device) -> bool:
    """dp4a: compiled kernels on an NVIDIA device of compute capability 6.1 or newer."""
    if device.type != "cuda" or torch.version.hip is not None or _INTERPRETED:
        return False
    return _cuda_capability(device.index) >= (6, 1)


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# ---- kernels ----------------------------------------------------------------------------

@triton.jit
def _dot_step(acc, x, w, PACKED: tl.constexpr, DP4A: tl.constexpr):
    """acc [BM, BN, BU] += x [BM, BU] * w [BN, BU] per element: 4 products per word when PACKED."""
    if DP4A:
        # NOTE: inline asm takes operands of one shape: broadcast both to the accumulator's
        x = tl.broadcast_to(x[:, None, :], acc.shape)
        w = tl.broadcast_to(w[None, :, :], acc.shape)
        acc = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [w, x, acc],
                                        dtype=tl.int32, is_pure=True, pack=1)
    elif PACKED:
        # byte j of a word, sign-extended: shift it to the top, then arithmetic-shift it down
        for top in tl.static_range(0, 32, 8):
            acc += ((x << top) >> 24)[:, None, :] * ((w << top) >> 24)[None, :, :]
    else:
        acc += x.to(tl.int32)[:, None, :] * w.to(tl.int32)[None, :, :]
    return acc


@triton.jit
def _load_step(ptrs, k_ok, EVEN_K: tl.constexpr):
    """One step's operand words; past K (a tail step, ``k_ok`` false) zeros."""
    if EVEN_K:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=k_ok, other=0)
    return v


@triton.jit
def _int8_gemv_kernel(
    q_ptr, w_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K_UNITS, units_per_split, stride_qm, stride_wn, stride_om, stride_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, PACKED: tl.constexpr,
    DP4A: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
):
    """BLOCK_N output columns for all rows (one K slice of them with SPLIT: int32 sums to
    out_ptr[slice]). A unit of K is an int32 word (PACKED) or one int8 value."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    us = tl.arange(0, BLOCK_U)
    k_start = tl.program_id(1) * units_per_split
    k_len = tl.minimum(K_UNITS - k_start, units_per_split)
    # Padding rows (M = 3 in a 4-row block) and columns past N read the last real row
    # instead: unmasked loads, results dropped at the store.
    q_rows = tl.minimum(rows, M - 1).to(tl.int64)
    w_cols = tl.minimum(cols, N - 1).to(tl.int64)
    q_ptrs = q_ptr + q_rows[:, None] * stride_qm + (k_start + us)[None, :]
    w_ptrs = w_ptr + w_cols[:, None] * stride_wn + (k_start + us)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_U), dtype=tl.int32)
    for k0 in range(0, k_len, BLOCK_U):
        k_ok = (k0 + us < k_len)[None, :]
        acc = _dot_step(acc, _load_step(q_ptrs, k_ok, EVEN_K), _load_step(w_ptrs, k_ok, EVEN_K), PACKED, DP4A)
        q_ptrs += BLOCK_U
        w_ptrs += BLOCK_U
    total = tl.sum(acc, axis=2)
    if SPLIT:
        part = out_ptr + tl.program_id(1).to(tl.int64) * stride_split
        part += rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(part, total, mask=(rows < M)[:, None] & (cols < N)[None, :])
    else:
        _epilogue(total, rows, cols, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, stride_om, HAS_BIAS)


# Triton's CPU interpreter (TRITON_INTERPRET=1 when the kernels were defined) runs no PTX.
_INTERPRETED = not isinstance(_int8_gemv_kernel, triton.runtime.JITFunction)
