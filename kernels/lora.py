"""LoRA of many adapters in one batch: each token's adapter delta added into a layer's output.

Owns: ``lora_delta(y, x, a, b, sorted_tokens, slot_start, slot_count, part_ends)``: for every
token t of slot s (the tokens grouped by slot as ``reference.group_by_slot`` lays them out)
and every part p of the layer (q, k, v of a merged attention projection; gate and up),
``y[t, part p] += (x[t] @ a[s, rows of p].T) @ b[s, part p].T``; the rows of no slot
(base-model tokens, a captured graph's padding rows) are not touched. Stateless. No host
sync and no shape that depends on the slots: a call can be captured in a CUDA graph and
replayed with other slots and counts.

The parts of a layer share its input, so one shrink serves them all (A of every part
stacked along the rank) and one expand writes them all: two launches per layer, not per
part (a Llama decode step: 256 launches, not 448).

Two launches over the tokens grouped by slot (segmented, as Punica's SGMV and vLLM's LoRA
kernels). Work comes in row blocks: slot s has ceil(count_s / block_m) of them, slots in
order; a program finds its block's slot from the counts on the device (a prefix sum over
the S slots). The grids are fixed by T, S and the shapes: ``ceil(T / block_m) + min(S, T)``
row blocks bound any split of T tokens over S slots, and programs past the step's blocks
return at once. So a decode step of 64 tokens over 64 slots launches 68 row blocks, not
64 x 4: an idle program still costs the card time, and a captured step replays them all
(a grid of slot x row block x 64-column tile spent 4 ms of an 8 ms Llama-3-8B decode step
at batch 64 on programs with no token, 1 ms with this one).

- ``_shrink_kernel``, grid (row block, K split): gathers up to ``block_m`` x rows of the
  block's slot and multiplies them by ``a[slot]`` over its slice of K, float32 sums into
  ``partial [splits, T, P * R]``.
- ``_expand_kernel``, grid (row block, column range; each range inside one part, so it
  takes that part's R columns of ``partial``): sums the rows' K splits in a fixed
  order (deterministic), rounds them to the adapters' dtype (as the reference's first
  matmul does), then walks its columns ``block_n`` at a time: times the ``b[slot]`` tile,
  added to ``y`` in float32, rounded once. Each (token, column) belongs to one program: no
  atomics.

float32 inputs multiply in IEEE float32 (no tf32). The K splits give a decode step's few
row blocks more of the card (at most 16, each at least 512 columns of K); an expand
program walks 256 columns (512 where N > 8192) in tiles of 128.

Measured on an H100 (2026-12-06, bf16, rank 16, T = 64 over 16 / 64 adapters, 10 calls per
CUDA graph, Llama-3-8B's layers): 8-15 / 13-42 us per call; summed over a step's 128
(layer) calls 1.39 / 3.21 ms, against 1.38 / 3.12 ms for the best of 24 launch shapes per
layer (splits 4-32, block_k 64-256, 256/512 columns per program). One part per call (224
calls) took 2.78 / 3.86 ms. A call this small is bound by its chain of dependent loads
and its two launches more than by bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.dot import dot_args


def lora_delta(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sorted_tokens: torch.Tensor,
               slot_start: torch.Tensor, slot_count: torch.Tensor, part_ends: tuple[int, ...] | None = None, *,
               block_m: int | None = None, block_n: int = 128, columns: int | None = None,
               block_k: int | None = None, splits: int | None = None) -> None:
    """In place: y [T, N] += the LoRA delta of each token's slot, for every part of a layer.

    Args:
        y: [T, N], last dim contiguous: the layer's output, its P parts side by side.
        x: [T, K], last dim contiguous: the input all parts share.
        a: [S, P * R, K] the parts' A stacked by slot, part p in rows [p R, (p + 1) R);
            b: [S, N, R] their B (scaled), part p in rows [part_ends[p - 1], part_ends[p]);
            last dims contiguous.
        sorted_tokens, slot_start, slot_count: int32, ``reference.group_by_slot`` of the
            step's token slots (sorted_tokens at least T long, the others S long).
        part_ends: the column where each part ends in y (increasing, the last N; at most
            ``MAX_PARTS``); default one part.
        block_m, block_n, columns (per expand program), block_k, splits: launch shape
            (default: by T, N and K).
    """
    ends = _part_ends(y, a, b, part_ends)
    _check(y, x, a, b, len(ends))
    tokens, k = x.shape
    num_slots, rank_all, n = a.shape[0], a.shape[1], b.shape[1]
    if tokens == 0 or rank_all == 0 or n == 0 or num_slots == 0:
        return
    block_m = block_m or (16 if tokens <= 256 else 64)
    blocks = triton.cdiv(tokens, block_m) + min(num_slots, tokens)
    block_k = block_k or min(128, max(16, triton.next_power_of_2(k)))
    splits = splits or max(1, min(16, k // 512))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)  # NOTE: no empty split: every partial is written
    starts = (0,) + ends[:-1]
    widest = max(e - s for s, e in zip(starts, ends))
    columns = triton.cdiv(columns or (256 if widest <= 8192 else 512), block_n) * block_n
    programs = _cumulative([triton.cdiv(e - s, columns) for s, e in zip(starts, ends)])
    partial = torch.empty((splits, tokens, rank_all), dtype=torch.float32, device=x.device)
    common = dict(BLOCK_M=block_m, S_PAD=max(16, triton.next_power_of_2(num_slots)), **dot_args(x))
    _shrink_kernel[(blocks, splits)](
        x, a, partial, sorted_tokens, slot_start, slot_count, num_slots, k, rank_all, k_per_split,
        x.stride(0), a.stride(0), a.stride(1), partial.stride(0), partial.stride(1), BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(rank_all)), **common)
    pad = (n,) * (MAX_PARTS - len(ends))
    _expand_kernel[(blocks, programs[-1])](
        partial, b, y, sorted_tokens, slot_start, slot_count, num_slots, n, rank_all // len(ends), splits, columns,
        *(ends[:-1] + pad), *(programs[:-1] + (programs[-1],) * (MAX_PARTS - len(ends))),
        partial.stride(0), partial.stride(1), b.stride(0), b.stride(1), y.stride(0), BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(rank_all // len(ends))), **common)


MAX_PARTS = 4  # q, k, v of an attention layer; gate and up of an MLP


def _part_ends(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               part_ends: tuple[int, ...] | None) -> tuple[int, ...]:
    n = y.shape[-1] if y.dim() else 0
    ends = tuple(int(e) for e in part_ends) if part_ends is not None else (n,)
    if not 1 <= len(ends) <= MAX_PARTS or ends[-1] != n or any(e1 < e0 for e0, e1 in zip((0,) + ends, ends)):
        raise ValueError(f"part_ends must be 1-{MAX_PARTS} increasing columns ending at N={n}, got {part_ends}")
    return ends


def _cumulative(counts: list[int]) -> tuple[int, ...]:
    total, out = 0, []
    for c in counts:
        total += c
        out.append(total)
    return tuple(out)


def _check(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, parts: int) -> None:
    if x.dim() != 2 or a.dim() != 3 or b.dim() != 3 or y.dim() != 2:
        raise ValueError(f"expected y [T, N], x [T, K], a [S, P*R, K], b [S, N, R]; got {tuple(y.shape)}, "
                         f"{tuple(x.shape)}, {tuple(a.shape)}, {tuple(b.shape)}")
    t, k = x.shape
    s, r, _ = a.shape
    if (a.shape[2] != k or b.shape[0] != s or r % parts or b.shape[2] != r // parts
            or y.shape != (t, b.shape[1])):
        raise ValueError(f"shapes disagree: y {tuple(y.shape)}, x {tuple(x.shape)}, a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}, {parts} part(s)")
    if any(v.stride(-1) != 1 for v in (y, x, a, b)):
        raise ValueError("y, x, a and b need a contiguous last dim")


@triton.jit
def _row_block(sorted_ptr, start_ptr, count_ptr, S, BLOCK_M: tl.constexpr, S_PAD: tl.constexpr):
    """(slot, token ids int64 [BLOCK_M], valid mask) of this program's row block; slot -1
    when the step has fewer blocks."""
    offs_s = tl.arange(0, S_PAD)
    counts = tl.load(count_ptr + offs_s, mask=offs_s < S, other=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, 0)
    pid = tl.program_id(0)
    slot = tl.sum((ends <= pid).to(tl.int32), 0)  # the first slot whose blocks end after pid
    first = tl.sum(tl.where(offs_s < slot, blocks, 0), 0)
    count = tl.sum(tl.where(offs_s == slot, counts, 0), 0)
    offs = (pid - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs < count
    start = tl.load(start_ptr + slot, mask=slot < S, other=0)
    tokens = tl.load(sorted_ptr + start + offs, mask=ok, other=0)
    return tl.where(slot < S, slot, -1), tokens.to(tl.int64), ok


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, partial_ptr, sorted_ptr, start_ptr, count_ptr, S, K, R, k_per_split,
                   stride_xt, stride_as, stride_ar, stride_ps, stride_pt,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, S_PAD: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    slot, tokens, m_ok = _row_block(sorted_ptr, start_ptr, count_ptr, S, BLOCK_M, S_PAD)
    if slot < 0:
        return
    split = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + tokens[:, None] * stride_xt
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < k_end
        xv = tl.load(x_rows + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        av = tl.load(a_rows + ks[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(xv.to(DOT_DTYPE), tl.trans(av.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    out = partial_ptr + split * stride_ps + tokens[:, None] * stride_pt + offs_r[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(partial_ptr, b_ptr, y_ptr, sorted_ptr, start_ptr, count_ptr, S, N, R, splits, columns,
                   E0, E1, E2, C0, C1, C2,
                   stride_ps, stride_pt, stride_bs, stride_bn, stride_yt,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, S_PAD: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    slot, tokens, m_ok = _row_block(sorted_ptr, start_ptr, count_ptr, S, BLOCK_M, S_PAD)
    if slot < 0:
        return
    # This program's column range lies inside one part: parts end at E0 < E1 < E2 (< N), and
    # their column programs at C0 < C1 < C2 (unused parts: N, resp. the grid's size).
    pid_n = tl.program_id(1)
    part = (pid_n >= C0).to(tl.int32) + (pid_n >= C1).to(tl.int32) + (pid_n >= C2).to(tl.int32)
    part_begin = tl.where(part == 0, 0, tl.where(part == 1, E0, tl.where(part == 2, E1, E2)))
    part_end = tl.where(part == 0, E0, tl.where(part == 1, E1, tl.where(part == 2, E2, N)))
    first = tl.where(part == 0, 0, tl.where(part == 1, C0, tl.where(part == 2, C1, C2)))
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    rows = partial_ptr + tokens[:, None] * stride_pt + part * R + offs_r[None, :]
    shrunk = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(splits):
        shrunk += tl.load(rows + s * stride_ps, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    shrunk = shrunk.to(b_ptr.dtype.element_ty).to(DOT_DTYPE)
    b_slot = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None]
    y_rows = y_ptr + tokens[:, None] * stride_yt
    n_begin = part_begin + (pid_n - first) * columns
    n_end = tl.minimum(n_begin + columns, part_end)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        bv = tl.load(b_slot + offs_n[None, :] * stride_bn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        delta = tl.dot(shrunk, bv.to(DOT_DTYPE), input_precision=PRECISION)  # bv: [BLOCK_R, BLOCK_N] of b[slot].T
        mask = m_ok[:, None] & n_ok[None, :]
        y = tl.load(y_rows + offs_n[None, :], mask=mask, other=0.0)
        tl.store(y_rows + offs_n[None, :], (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)
