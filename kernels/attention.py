"""Paged attention: Triton kernels for causal attention over the paged KV cache.

Owns: ``paged_attention`` and its two paths. Stateless; every call reads the
forward-pass metadata it is given and writes a fresh (or caller-given) output.

- Decode (``max_query_len == 1``): one program per (sequence, KV head, split).
  Long contexts are split across programs ("flash-decoding"); each split writes
  an unnormalised partial output with its running max and sum, and a second
  kernel merges the splits. With a single split the first kernel writes the
  final output directly.
- Prefill / mixed batches: one program per (query tile, KV head); a tile holds
  up to ``BLOCK_M // group`` query tokens of one sequence times the ``group``
  query heads that share the KV head, and walks the KV blocks up to its causal
  limit with an online softmax.

Both paths keep the query heads of one KV head in one program, so every KV
element is read once per group. Numerics follow ``reference.paged_attention_ref``:
float32 accumulation, exact (IEEE) float32 products for float32 inputs.

KV layout (one layer): ``kv_layer[num_blocks, 2, block_size, num_kv_heads, head_dim]``,
any strides on the first three dims, the last two dims contiguous.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode path; ``num_splits=None`` picks it from the device."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None


@dataclass(frozen=True)
class PrefillConfig:
    """Launch shape of the prefill path (``block_m`` rows = query tokens x group heads)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                    max_query_len: int, max_seq_len: int, *,
                    out: torch.Tensor | None = None, min_split_tiles: int = 4) -> torch.Tensor:
    """Causal attention of variable-length query chunks over a paged KV cache.

    Args:
        q: [T, Hq, D] queries; sequence b owns rows query_start_loc[b]:query_start_loc[b+1],
            which are the last positions of its seq_lens[b] context.
        kv_layer: [num_blocks, 2, block_size, Hkv, D]; holds the KV of every context token.
        query_start_loc: [B+1] int32, non-decreasing (zero-length chunks allowed).
        seq_lens: [B] int32 context length of each sequence, new tokens included.
        block_tables: [B, max_blocks] int32, padded; only the first
            ceil(seq_lens[b] / block_size) entries of row b are read.
        scale: softmax scale.
        max_query_len: longest chunk; 1 selects the decode path.
        max_seq_len: longest context (or an upper bound of it); sizes the decode split.
        out: optional [T, Hq, D] output buffer (rows of no sequence are left untouched).
        min_split_tiles: decode: KV tiles a split walks at least. Pass 1 when max_seq_len
            is only a bound (a captured graph): splits past a sequence's end return at once,
            so short splits keep enough programs busy at the real, shorter contexts.

    Returns:
        [T, Hq, D] in q.dtype.
    """
    if max_query_len <= 1:
        return paged_decode_attention(q, kv_layer, query_start_loc, seq_lens, block_tables,
                                      scale, max_seq_len, out=out, min_split_tiles=min_split_tiles)
    return paged_prefill_attention(q, kv_layer, query_start_loc, seq_lens, block_tables,
                                   scale, out=out)


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, query_start_loc: torch.Tensor,
                           seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                           max_seq_len: int, *, out: torch.Tensor | None = None,
                           config: DecodeConfig | None = None, min_split_tiles: int = 4) -> torch.Tensor:
    """Decode path of ``paged_attention``: every chunk holds at most one query."""
    q, kv_layer, out = _check_inputs(q, kv_layer, block_tables, out)
    cfg = config or _default_decode_config(q, kv_layer)
    batch, kv_heads = seq_lens.shape[0], kv_layer.shape[3]
    if batch == 0 or q.shape[0] == 0:
        return out
    splits = cfg.num_splits or _pick_num_splits(q.device, batch * kv_heads, max_seq_len, cfg.block_n,
                                                min_split_tiles)
    split_len = cfg.block_n * triton.cdiv(triton.cdiv(max(max_seq_len, 1), splits), cfg.block_n)
    splits = triton.cdiv(max(max_seq_len, 1), split_len)
    group, head_dim = q.shape[1] // kv_heads, q.shape[2]
    if splits > 1:
        part_out = torch.empty((batch, q.shape[1], splits, head_dim), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((batch, q.shape[1], splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_out = part_ml = out  # unused by the kernel
    _decode_split_kernel[(batch, kv_heads, splits)](
        q, kv_layer, query_start_loc, seq_lens, block_tables, out, part_out, part_ml,
        scale * _LOG2E, split_len, splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=kv_layer.shape[2], BLOCK_N=cfg.block_n, SPLIT=splits > 1,
        PRECISION=_precision(q), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        _decode_reduce_kernel[(batch, q.shape[1])](
            query_start_loc, seq_lens, out, part_out, part_ml, split_len, splits,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(splits),
            num_warps=4,
        )
    return out


def paged_prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, *,
                            out: torch.Tensor | None = None,
                            config: PrefillConfig | None = None) -> torch.Tensor:
    """Prefill / mixed path of ``paged_attention``: chunks of any length."""
    q, kv_layer, out = _check_inputs(q, kv_layer, block_tables, out)
    cfg = config or _default_prefill_config(q, kv_layer)
    batch, kv_heads = seq_lens.shape[0], kv_layer.shape[3]
    if batch == 0 or q.shape[0] == 0:
        return out
    group, head_dim = q.shape[1] // kv_heads, q.shape[2]
    block_m = max(cfg.block_m, 16, triton.next_power_of_2(group))
    block_q = block_m // group
    # NOTE: sequence b's tiles are numbered from query_start_loc[b] // block_q + b, so
    # the ranges of consecutive sequences never overlap and q.shape[0] // block_q + batch
    # programs cover every tile; programs that land in a gap return at once.
    grid = (q.shape[0] // block_q + batch, kv_heads)
    _prefill_kernel[grid](
        q, kv_layer, query_start_loc, seq_lens, block_tables, out, scale * _LOG2E, batch,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=kv_layer.shape[2],
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=cfg.block_n,
        PRECISION=_precision(q), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _check_inputs(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                  out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.dim() != 3 or kv_layer.dim() != 5 or kv_layer.shape[1] != 2:
        raise ValueError(f"expected q [T, Hq, D] and kv_layer [blocks, 2, block_size, Hkv, D], "
                         f"got {tuple(q.shape)} and {tuple(kv_layer.shape)}")
    head_dim, kv_heads, block_size = q.shape[2], kv_layer.shape[3], kv_layer.shape[2]
    if kv_layer.shape[4] != head_dim or q.shape[1] % kv_heads:
        raise ValueError(f"q heads {q.shape[1]} / head_dim {head_dim} do not match "
                         f"kv heads {kv_heads} / head_dim {kv_layer.shape[4]}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim {head_dim} must be a power of two >= 16")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} must be a power of two")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be a row-contiguous [B, max_blocks] int32 tensor, "
                         f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    if q.stride(2) != 1:
        q = q.contiguous()
    if kv_layer.stride(4) != 1 or kv_layer.stride(3) != head_dim:
        raise ValueError("kv_layer's last two dims (heads, head_dim) must be contiguous")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    return q, kv_layer, out


def _precision(q: torch.Tensor) -> str:
    """How ``_dot`` multiplies: float32 inputs must not be rounded to tf32 by the matrix units.

    NOTE: Triton's CPU interpreter multiplies bfloat16 operands as raw integers, so
    off-GPU they are widened to float32 first (exact: bf16 products fit in fp32).
    """
    if q.dtype == torch.float32:
        return "ieee"
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        return "widen"
    return "tf32"


def _default_decode_config(q: torch.Tensor, kv_layer: torch.Tensor) -> DecodeConfig:
    if q.device.type != "cuda":
        return DecodeConfig(block_n=32, num_warps=4, num_stages=1)
    head_dim = q.shape[2]
    if head_dim >= 256 or q.dtype == torch.float32:
        return DecodeConfig(block_n=32, num_warps=4, num_stages=2)
    return DecodeConfig(block_n=64, num_warps=4, num_stages=3)


def _default_prefill_config(q: torch.Tensor, kv_layer: torch.Tensor) -> PrefillConfig:
    if q.device.type != "cuda":
        return PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
    head_dim = q.shape[2]
    if head_dim >= 256 or q.dtype == torch.float32:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)


def _pick_num_splits(device: torch.device, programs: int, max_seq_len: int, block_n: int,
                     min_tiles: int = 4) -> int:
    """Split count that gives about two (sequence, KV head, split) programs per multiprocessor.

    NOTE: more splits than that cost more than they balance: at batch 64 x 4096 (512
    programs) one split reads KV at 97% of copy bandwidth and 8 splits at 92%, while
    batch 4 needs 8-16 splits to get anywhere (see kernels/README.md).
    """
    target = 2 * _multiprocessors(device.index) if device.type == "cuda" else 4
    max_splits = max(1, max_seq_len // (min_tiles * block_n))  # each split walks at least min_tiles tiles
    return max(1, min(math.ceil(target / programs), max_splits, 64))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == "widen":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _attend(acc, m_i, l_i, q, q_pos, k_base, bt_row, lo, hi, scale_log2,
            stride_kb, stride_kkv, stride_ks,
            HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
            PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) with KV tokens [lo, hi) of one sequence.

    Row r sees token n only if n <= q_pos[r]; unless MASKED, the caller guarantees
    that every token in [lo, hi) is visible to every row (and hi - lo is whole tiles).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + offs_n
        if MASKED:
            n_mask = n < hi
            blk = tl.load(bt_row + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row + n // BLOCK_SIZE).to(tl.int64)
        k_ptrs = k_base + (blk * stride_kb + (n % BLOCK_SIZE) * stride_ks)[:, None] + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=n_mask[:, None], other=0.0).to(q.dtype)
            v = tl.load(k_ptrs + stride_kkv, mask=n_mask[:, None], other=0.0).to(q.dtype)
        else:
            k = tl.load(k_ptrs).to(q.dtype)
            v = tl.load(k_ptrs + stride_kkv).to(q.dtype)
        s = _dot(q, tl.trans(k), PRECISION) * scale_log2
        if MASKED:
            s = tl.where(n_mask[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_split_kernel(
    q_ptr, kv_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, out_ptr, part_out_ptr, part_ml_ptr,
    scale_log2, split_len, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kkv, stride_ks, stride_kh, stride_btb,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_tok = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) == q_tok:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * split_len
    if start >= seq_len:
        return
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q_row = q_tok.to(tl.int64) * stride_qt
    q = tl.load(q_ptr + q_row + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    q_pos = tl.zeros([GROUP_PAD], tl.int32) + (seq_len - 1)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, kv_ptr + kvh * stride_kh,
                            bt_ptr + b.to(tl.int64) * stride_btb, start, end, scale_log2,
                            stride_kb, stride_kkv, stride_ks,
                            HEAD_DIM, BLOCK_SIZE, BLOCK_N, PRECISION, MASKED=True)

    if SPLIT:
        # part_out [B, Hq, num_splits, D] and part_ml [B, Hq, num_splits, 2], both contiguous.
        row = (b.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * num_splits + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)
    else:
        o = acc / l_i[:, None]
        o_ptrs = out_ptr + q_tok.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


@triton.jit
def _decode_reduce_kernel(
    qsl_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_ml_ptr, split_len, num_splits,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    q_tok = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) == q_tok:
        return
    used = tl.cdiv(tl.load(seq_lens_ptr + b), split_len)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < used
    row = (b.to(tl.int64) * tl.num_programs(1) + head) * num_splits + offs_s
    m = tl.load(part_ml_ptr + row * 2, mask=s_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=s_mask, other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    acc = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    o_ptrs = out_ptr + q_tok.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _find_sequence(qsl_ptr, num_seqs, tile_id, BLOCK_Q: tl.constexpr):
    """Largest b with query_start_loc[b] // BLOCK_Q + b <= tile_id (binary search)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= tile_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_kernel(
    q_ptr, kv_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, out_ptr, scale_log2, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kkv, stride_ks, stride_kh, stride_btb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile_id = tl.program_id(0)
    kvh = tl.program_id(1)
    b = _find_sequence(qsl_ptr, num_seqs, tile_id, BLOCK_Q)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    tile = tile_id - (q_start // BLOCK_Q + b)
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_start = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_local = tile * BLOCK_Q + offs_m // GROUP
    heads = kvh * GROUP + offs_m % GROUP
    row_mask = (offs_m < BLOCK_Q * GROUP) & (q_local < q_len)
    # Rows past the chunk get the last position so that no row is fully masked.
    q_pos = tl.minimum(ctx_start + q_local, seq_len - 1)
    q_rows = (q_start + q_local).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = kv_ptr + kvh * stride_kh
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    # Keys before the tile's first query position are visible to every row: no mask there.
    full_end = (ctx_start + tile * BLOCK_Q + 1) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(seq_len, ctx_start + (tile + 1) * BLOCK_Q)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_base, bt_row, 0, full_end, scale_log2,
                            stride_kb, stride_kkv, stride_ks,
                            HEAD_DIM, BLOCK_SIZE, BLOCK_N, PRECISION, MASKED=False)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_base, bt_row, full_end, kv_end, scale_log2,
                            stride_kb, stride_kkv, stride_ks,
                            HEAD_DIM, BLOCK_SIZE, BLOCK_N, PRECISION, MASKED=True)

    o = acc / l_i[:, None]
    o_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
