"""Mixture of experts: Triton grouped GEMMs for the experts of a sparse (MoE) MLP.

Owns: ``fused_moe`` (gate_up, SiLU-and-mul, down, routing weights and the sum over
the top-k) and ``align_pairs``, the routing plan it runs on. Stateless; every call
allocates its scratch. Numerics follow ``reference.fused_moe_ref``: float32
accumulation, the SiLU-and-mul intermediate rounded once to x's dtype, routing
weights applied and the K contributions summed in float32, one final rounding.

Two launch shapes, chosen by the number of (token, k) pairs (``use_pairs_path``); neither
waits for the host, so a call can be captured in a CUDA graph.

Pairs path (decode: T*K <= 64 and <= E), two launches, no alignment:

- ``_gate_up_pairs_kernel``: per (pair, I tile), the pair's expert read from ``topk_ids`` on
  the device; its gate and up row tiles stream as a GEMV with the one x row (float32 FMAs),
  SiLU-and-mul in the epilogue -> ``act [T*K, I]`` in x's dtype.
- ``_down_pairs_kernel``: per (token, H tile), all K of the token's act rows @ w2[e].T
  as one [K, BLOCK_H, BLOCK_K] GEMV, times the routing weights, summed over k in registers
  -> ``out`` (no float32 scratch, no top-k sum launch).

Grouped path (prefill), five launches (four for T*K <= 64):

- ``_count_kernel`` / ``_place_kernel`` (``align_pairs``): the T*K (token, k) pairs
  sorted by expert, each expert's group padded to whole ``block_m`` row blocks.
- ``_gate_up_kernel``: per (row block, column tile), the block's gathered x rows @ its
  expert's w13.T, gate and up column tiles side by side, SiLU-and-mul in the epilogue
  -> ``act [T*K, I]`` in x's dtype (row = pair id ``t * K + k``).
- ``_down_kernel``: act rows @ w2[e].T times the pair's routing weight -> float32 (or, with
  ``MoeConfig.wide_partials`` off, x's dtype) ``partial [T*K, H]``; ``_sum_topk_kernel``
  adds each token's K rows into ``out`` in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pdserve.kernels.dot import dot_args

try:  # grid dependency control (programmatic dependent launch), Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # pragma: no cover - older Triton: the pairs path runs without PDL
    gdc_launch_dependents = gdc_wait = None
    _HAS_GDC = False

# align_pairs: pairs handled per step (one-hot tiles of _ALIGN_STEP x E), and at most
# this many programs (each reads the whole [programs, E] count table).
_ALIGN_STEP = 64
_ALIGN_MAX_PROGRAMS = 128
# The pairs path serves up to this many (token, k) pairs (decode batches up to 8 tokens at K=8).
PAIRS_PATH_MAX = 64


@dataclass(frozen=True)
class MoeConfig:
    """Launch shape of both grouped GEMMs.

    ``block_n`` columns of gate and as many of up per program in the first; ``group_m``
    row blocks share each column tile in launch order, so weight tiles are reused from L2.
    ``wide_partials``: each (token, k) pair's weighted down output is kept in float32 until
    the top-k sum; off, in x's dtype (half the scratch bytes of a 16-bit model: written once
    and read once per pair, about a fifth of a long prefill's MoE time on an H100), each
    pair's contribution then rounded once before the float32 sum.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3
    wide_partials: bool = True


@dataclass(frozen=True)
class PairsConfig:
    """Launch shape of the pairs path (small T*K: GEMVs per pair, no alignment).

    gate_up: ``block_n`` gate rows and as many up rows per program, walked ``block_k`` columns
    of H at a time. down: ``down_block_h`` rows of w2 for each of a token's K experts per program,
    walked ``down_block_k`` columns of I at a time. ``pdl``: the down launch is a programmatic
    dependent launch (Hopper and newer): its programs start while gate_up finishes, load their first
    w2 tile, and only then wait for ``act``.
    """

    block_n: int = 2
    block_k: int = 1024
    num_warps: int = 4
    down_block_h: int = 4
    down_block_k: int = 128
    down_num_warps: int = 4
    pdl: bool = False


class PairAlignment(NamedTuple):
    """The (token, k) pairs sorted by expert, each expert's group padded to whole row blocks.

    sorted_ids: [max_blocks * block_m] int32 pair ids ``t * K + k``; padding holds ``T * K``.
    block_experts: [max_blocks] int32 expert of each row block (``E`` past the end).
    num_padded: [1] int32 rows in use (a multiple of block_m); blocks from there on are idle.
    """

    sorted_ids: torch.Tensor
    block_experts: torch.Tensor
    num_padded: torch.Tensor


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, out: torch.Tensor | None = None,
              config: MoeConfig | PairsConfig | None = None) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (rows [0, I) are the gate projection, [I, 2I) the up projection, like
    nn.Linear weights); w2 [E, H, I]; topk_weights [T, K] (float32); topk_ids [T, K] (int32 or int64, values in
    [0, E); a token never has the same expert twice). Returns out [T, H] in x's dtype:
    out[t] = sum_k topk_weights[t, k] * (silu(x[t] @ w13[e, :I].T) * (x[t] @ w13[e, I:].T)) @ w2[e].T, e = topk_ids[t, k].
    ``config`` overrides the path and its launch shape: a ``PairsConfig`` runs the pairs path, a
    ``MoeConfig`` the grouped path (default: ``use_pairs_path``, then ``default_pairs_config`` or
    ``default_config``).
    """
    x, w13, w2, out = _check_inputs(x, w13, w2, topk_weights, topk_ids, out)
    tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    pairs = tokens * top_k
    if pairs == 0 or hidden == 0 or inter == 0:
        return out.zero_()
    if config is None:
        config = (default_pairs_config(x) if use_pairs_path(pairs, num_experts)
                  else default_config(x, pairs, num_experts))
    if isinstance(config, PairsConfig):
        act = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
        _gate_up_pairs(x, w13, topk_ids, act, config)
        _down_pairs(act, w2, topk_weights, topk_ids, out, config)
        return out
    cfg = config
    plan = align_pairs(topk_ids, num_experts, cfg.block_m)
    max_blocks = plan.block_experts.shape[0]
    act = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    partial = torch.empty((pairs, hidden), dtype=torch.float32 if cfg.wide_partials else x.dtype, device=x.device)
    routing = topk_weights.to(torch.float32).reshape(-1).contiguous()
    launch = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_args(x))
    _gate_up_kernel[(max_blocks * triton.cdiv(inter, cfg.block_n),)](
        x, w13, act, *plan, max_blocks, pairs, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), TOP_K=top_k, **launch,
    )
    _down_kernel[(max_blocks * triton.cdiv(hidden, cfg.block_n),)](
        act, w2, partial, routing, *plan, max_blocks, pairs, hidden, inter,
        act.stride(0), w2.stride(0), w2.stride(1), partial.stride(0), **launch,
    )
    block = min(triton.next_power_of_2(hidden), 1024)
    _sum_topk_kernel[(tokens, triton.cdiv(hidden, block))](
        partial, out, hidden, out.stride(0), TOP_K=top_k, BLOCK=block, num_warps=4,
    )
    return out


def use_pairs_path(pairs: int, num_experts: int) -> bool:
    """The pairs path for T*K <= ``PAIRS_PATH_MAX`` pairs, and no more pairs than experts.

    Each pair streams its expert's weights itself, so pairs that share an expert read them
    again (from L2 when they run together: programs of one column tile launch side by side);
    with few experts (many pairs per expert) the grouped path reads each expert once.
    """
    return pairs <= min(PAIRS_PATH_MAX, num_experts)


def default_pairs_config(x: torch.Tensor) -> PairsConfig:
    """Pairs-path launch shape (sweep on an H100, bf16, E=128, K=8, H=2048, I=768: kernels/README.md).

    float32 (4-byte weights, a correctness path) takes half the gate_up columns per step; off-GPU
    (the Triton interpreter) wide tiles, few programs. PDL where the device (Hopper or newer) and
    Triton have it.
    """
    if x.device.type != "cuda":
        return PairsConfig(block_n=16, block_k=64, down_block_h=16, down_block_k=64)
    pdl = _HAS_GDC and torch.cuda.get_device_capability(x.device)[0] >= 9
    if x.dtype == torch.float32:
        return PairsConfig(block_n=2, block_k=512, down_block_h=8, down_block_k=128, down_num_warps=8, pdl=pdl)
    return PairsConfig(pdl=pdl)


def default_config(x: torch.Tensor, pairs: int, num_experts: int) -> MoeConfig:
    """Launch shape by the average rows per expert, ``pairs / E`` (sweep on an H100, bf16, E=128, K=8,
    H=2048, I=768: kernels/README.md).

    Up to 16 (decode): 16-row blocks; the weights of the used experts stream once, with little
    padding. Up to 64: 64-row blocks. More (long prefill): 128-row blocks, so each weight tile
    serves more rows. float32 (IEEE products) takes smaller tiles.
    """
    if x.device.type != "cuda":
        return MoeConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=1)
    wide = x.dtype != torch.float32
    if pairs <= 16 * num_experts:
        return MoeConfig(block_m=16, block_n=64, block_k=128 if wide else 64, num_warps=4,
                         num_stages=4 if wide else 3)
    if not wide:
        return MoeConfig(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=3)
    if pairs <= 64 * num_experts:
        return MoeConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=3)
    return MoeConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> PairAlignment:
    """Sort the T*K pairs of topk_ids [T, K] by expert (stable), padding each expert's group to whole
    block_m blocks.

    Sized by the upper bound ``T*K + min(E, T*K) * (block_m - 1)`` rows, so nothing waits for the
    device; the GEMMs skip the blocks past ``num_padded``. Ids outside [0, E) are not checked.
    """
    device = topk_ids.device
    ids = topk_ids.reshape(-1).contiguous()  # reshape can give a strided view (e.g. K=1 of a wider slice)
    pairs = ids.numel()
    max_blocks = triton.cdiv(pairs + min(num_experts, pairs) * (block_m - 1), block_m)
    chunk = max(_ALIGN_STEP, triton.next_power_of_2(triton.cdiv(pairs, _ALIGN_MAX_PROGRAMS)))
    programs = max(1, triton.cdiv(pairs, chunk))
    plan = PairAlignment(torch.empty(max_blocks * block_m, dtype=torch.int32, device=device),
                         torch.empty(max_blocks, dtype=torch.int32, device=device),
                         torch.empty(1, dtype=torch.int32, device=device))
    shape = dict(NUM_EXPERTS=num_experts, E_PAD=triton.next_power_of_2(num_experts), STEP=_ALIGN_STEP,
                 num_warps=4)
    slots = max_blocks * block_m
    counts = plan.num_padded  # unused with one program
    if programs > 1:
        counts = torch.empty((programs, num_experts), dtype=torch.int32, device=device)
        _count_kernel[(programs,)](ids, counts, plan.sorted_ids, pairs, chunk, triton.cdiv(slots, programs),
                                   slots, **shape)
    _place_kernel[(programs,)](ids, counts, *plan, pairs, chunk, programs, slots, max_blocks,
                               triton.cdiv(max_blocks, programs), BLOCK_M=block_m, SINGLE=programs == 1, **shape)
    return plan


def _check_inputs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, out: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or w13.shape[1] % 2:
        raise ValueError(f"expected x [T, H], w13 [E, 2I, H] and w2 [E, H, I], got {tuple(x.shape)}, "
                         f"{tuple(w13.shape)} and {tuple(w2.shape)}")
    (tokens, hidden), (num_experts, inter2) = x.shape, w13.shape[:2]
    if w13.shape[2] != hidden or tuple(w2.shape) != (num_experts, hidden, inter2 // 2):
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not match x {tuple(x.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"expected topk_weights and topk_ids [T={tokens}, K], got {tuple(topk_weights.shape)} "
                         f"and {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"x, w13 and w2 must share a dtype, got {x.dtype}, {w13.dtype} and {w2.dtype}")
    x = x if x.stride(1) == 1 else x.contiguous()
    w13 = w13 if w13.stride(2) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(2) == 1 else w2.contiguous()
    if out is None:
        out = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    elif out.shape != (tokens, hidden) or out.dtype != x.dtype or (hidden and out.stride(1) != 1):
        raise ValueError(f"out must be {(tokens, hidden)} {x.dtype} with a contiguous last dim")
    return x, w13, w2, out


def _gate_up_pairs(x: torch.Tensor, w13: torch.Tensor, topk_ids: torch.Tensor, act: torch.Tensor,
                   cfg: PairsConfig):
    """act[t * K + k] = silu(x[t] @ w13[e, :I].T) * (x[t] @ w13[e, I:].T), e = topk_ids[t, k]."""
    pairs, inter = act.shape
    return _gate_up_pairs_kernel[(pairs * triton.cdiv(inter, cfg.block_n),)](
        x, w13, topk_ids, act, pairs, x.shape[1], inter, x.stride(0), topk_ids.stride(0), topk_ids.stride(1),
        w13.stride(0), w13.stride(1), act.stride(0), TOP_K=topk_ids.shape[1], BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, LAUNCH_DEPENDENTS=cfg.pdl, num_warps=cfg.num_warps,
    )


def _down_pairs(act: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                out: torch.Tensor, cfg: PairsConfig):
    """out[t] = sum_k topk_weights[t, k] * act[t * K + k] @ w2[topk_ids[t, k]].T."""
    tokens, hidden = out.shape
    top_k = topk_ids.shape[1]
    pdl = dict(launch_pdl=True) if cfg.pdl else {}
    return _down_pairs_kernel[(tokens * triton.cdiv(hidden, cfg.down_block_h),)](
        act, w2, topk_weights, topk_ids, out, tokens, hidden, act.shape[1], act.stride(0),
        w2.stride(0), w2.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        topk_ids.stride(0), topk_ids.stride(1), out.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_H=cfg.down_block_h, BLOCK_K=cfg.down_block_k,
        WAIT=cfg.pdl, num_warps=cfg.down_num_warps, **pdl,
    )


@triton.jit
def _one_hot(ids_ptr, start, end, E_PAD: tl.constexpr, STEP: tl.constexpr):
    """(pair ids, [STEP, E_PAD] int32 one-hot of their experts) of pairs [start, min(start + STEP, end))."""
    idx = start + tl.arange(0, STEP)
    expert = tl.load(ids_ptr + idx, mask=idx < end, other=-1).to(tl.int32)
    return idx, (expert[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)


@triton.jit
def _histogram(ids_ptr, start, end, E_PAD: tl.constexpr, STEP: tl.constexpr):
    hist = tl.zeros([E_PAD], dtype=tl.int32)
    for s in range(start, end, STEP):
        _, hot = _one_hot(ids_ptr, s, end, E_PAD, STEP)
        hist += tl.sum(hot, axis=0)
    return hist


@triton.jit
def _fill(ptr, start, end, value, STEP: tl.constexpr):
    for s in range(start, end, STEP):
        offs = s + tl.arange(0, STEP)
        tl.store(ptr + offs, tl.zeros([STEP], tl.int32) + value, mask=offs < end)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, sorted_ids_ptr, num_pairs, chunk, fill_chunk, num_slots,
                  NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, STEP: tl.constexpr):
    """Program c: counts[c, e] = pairs of expert e in its chunk; fills its share of sorted_ids with the sentinel."""
    c = tl.program_id(0)
    hist = _histogram(ids_ptr, c * chunk, tl.minimum((c + 1) * chunk, num_pairs), E_PAD, STEP)
    offs_e = tl.arange(0, E_PAD)
    tl.store(counts_ptr + c * NUM_EXPERTS + offs_e, hist, mask=offs_e < NUM_EXPERTS)
    _fill(sorted_ids_ptr, c * fill_chunk, tl.minimum((c + 1) * fill_chunk, num_slots), num_pairs, STEP)


@triton.jit
def _place_kernel(ids_ptr, counts_ptr, sorted_ids_ptr, block_experts_ptr, num_padded_ptr,
                  num_pairs, chunk, num_chunks, num_slots, max_blocks, blocks_per_program,
                  BLOCK_M: tl.constexpr, NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, STEP: tl.constexpr,
                  SINGLE: tl.constexpr, ROWS: tl.constexpr = 16):
    """Program c: writes its chunk's pairs to their sorted slots and the experts of its share of blocks.

    SINGLE (one chunk): counts and fills here instead of ``_count_kernel``, one launch less for decode.
    """
    c = tl.program_id(0)
    offs_e = tl.arange(0, E_PAD)
    e_ok = offs_e < NUM_EXPERTS
    before = tl.zeros([E_PAD], dtype=tl.int32)  # pairs of each expert in the chunks before c
    if SINGLE:
        totals = _histogram(ids_ptr, 0, num_pairs, E_PAD, STEP)
        _fill(sorted_ids_ptr, 0, num_slots, num_pairs, STEP)
        tl.debug_barrier()  # every thread's sentinels land before the placements below
    else:
        totals = tl.zeros([E_PAD], dtype=tl.int32)
        for r0 in range(0, num_chunks, ROWS):
            r = r0 + tl.arange(0, ROWS)
            rows = tl.load(counts_ptr + r[:, None] * NUM_EXPERTS + offs_e[None, :],
                           mask=(r < num_chunks)[:, None] & e_ok[None, :], other=0)
            totals += tl.sum(rows, axis=0)
            before += tl.sum(tl.where((r < c)[:, None], rows, 0), axis=0)
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    if c == 0:
        tl.store(num_padded_ptr, tl.sum(padded, axis=0))

    start = c * chunk
    end = tl.minimum(start + chunk, num_pairs)
    next_slot = ends - padded + before
    for s in range(start, end, STEP):
        idx, hot = _one_hot(ids_ptr, s, end, E_PAD, STEP)
        rank = tl.cumsum(hot, axis=0) - hot  # earlier pairs of the same expert in this step
        slot = tl.sum(hot * (rank + next_slot[None, :]), axis=1)
        tl.store(sorted_ids_ptr + slot, idx, mask=idx < end)
        next_slot += tl.sum(hot, axis=0)

    b_end = tl.minimum((c + 1) * blocks_per_program, max_blocks)
    for b0 in range(c * blocks_per_program, b_end, STEP):
        blocks = b0 + tl.arange(0, STEP)
        done = (ends[None, :] <= blocks[:, None] * BLOCK_M) & e_ok[None, :]
        tl.store(block_experts_ptr + blocks, tl.sum(done.to(tl.int32), axis=1), mask=blocks < b_end)


@triton.jit
def _grouped_tile(pid, n_tiles, max_blocks, GROUP_M: tl.constexpr):
    """(row block, column tile) of program ``pid``: GROUP_M row blocks walk each column tile
    together, so its weight tiles are reused from L2."""
    first = pid // (GROUP_M * n_tiles) * GROUP_M
    rows_in_group = tl.minimum(max_blocks - first, GROUP_M)
    return first + pid % (GROUP_M * n_tiles) % rows_in_group, pid % (GROUP_M * n_tiles) // rows_in_group


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, act_ptr, sorted_ids_ptr, block_experts_ptr, num_padded_ptr,
                    max_blocks, num_pairs, hidden, inter, stride_xt, stride_we, stride_wn, stride_act,
                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    PRECISION: tl.constexpr):
    block, tile = _grouped_tile(tl.program_id(0), tl.cdiv(inter, BLOCK_N), max_blocks, GROUP_M)
    if block * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    pairs = pairs.to(tl.int64)
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + (pairs // TOP_K)[:, None] * stride_xt + ks[None, :]
    # B tiles are [BLOCK_K, BLOCK_N] views of the row-major [2I, H] weight.
    g_ptrs = w_ptr + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None]
    u_ptrs = g_ptrs + inter * stride_wn
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = (k0 + ks) < hidden
        b_mask = k_ok[:, None] & col_ok[None, :]
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        bg = tl.load(g_ptrs + k0, mask=b_mask, other=0.0).to(DOT_DTYPE)
        bu = tl.load(u_ptrs + k0, mask=b_mask, other=0.0).to(DOT_DTYPE)
        gate = tl.dot(a, bg, gate, input_precision=PRECISION)
        up = tl.dot(a, bu, up, input_precision=PRECISION)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(act_ptr + pairs[:, None] * stride_act + cols[None, :], y.to(act_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(act_ptr, w_ptr, partial_ptr, routing_ptr, sorted_ids_ptr, block_experts_ptr, num_padded_ptr,
                 max_blocks, num_pairs, hidden, inter, stride_act, stride_we, stride_wn, stride_partial,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    block, tile = _grouped_tile(tl.program_id(0), tl.cdiv(hidden, BLOCK_N), max_blocks, GROUP_M)
    if block * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    pairs = pairs.to(tl.int64)
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + pairs[:, None] * stride_act + ks[None, :]
    b_ptrs = w_ptr + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = (k0 + ks) < inter
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        b = tl.load(b_ptrs + k0, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    acc *= tl.load(routing_ptr + pairs, mask=row_ok, other=0.0)[:, None]
    tl.store(partial_ptr + pairs[:, None] * stride_partial + cols[None, :], acc.to(partial_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_topk_kernel(partial_ptr, out_ptr, hidden, stride_out, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(TOP_K):
        acc += tl.load(partial_ptr + (token * TOP_K + k) * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gate_up_pairs_kernel(x_ptr, w_ptr, ids_ptr, act_ptr, num_pairs, hidden, inter, stride_xt,
                          stride_it, stride_ik, stride_we, stride_wn, stride_act,
                          TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          LAUNCH_DEPENDENTS: tl.constexpr):
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()  # the down launch (PDL) may start once every program got here
    # Pairs vary fastest: the pairs of one column tile run side by side, so pairs that share
    # an expert read its tile from L2.
    pid = tl.program_id(0)
    pair = pid % num_pairs
    tile = pid // num_pairs
    token = pair // TOP_K
    expert = tl.load(ids_ptr + token * stride_it + (pair % TOP_K) * stride_ik).to(tl.int64)
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < inter
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token.to(tl.int64) * stride_xt + ks
    g_ptrs = w_ptr + expert * stride_we + rows.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    u_ptrs = g_ptrs + inter * stride_wn
    # Per-lane float32 partial sums (IEEE FMAs for every dtype), reduced once at the end.
    gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    w_mask = row_ok[:, None] & (ks < hidden)[None, :]
    g = tl.load(g_ptrs, mask=w_mask, other=0.0)
    u = tl.load(u_ptrs, mask=w_mask, other=0.0)
    for k0 in range(0, hidden, BLOCK_K):
        xv = tl.load(x_ptrs + k0, mask=(k0 + ks) < hidden, other=0.0).to(tl.float32)[None, :]
        gate += g.to(tl.float32) * xv
        up += u.to(tl.float32) * xv
        # The next step's tiles (nothing past H). NOTE: issuing these before the FMAs above (two
        # tiles in flight) measured slower on an H100 (21.2 us vs 19.0 at T=1).
        next_mask = row_ok[:, None] & ((k0 + BLOCK_K + ks) < hidden)[None, :]
        g = tl.load(g_ptrs + (k0 + BLOCK_K), mask=next_mask, other=0.0)
        u = tl.load(u_ptrs + (k0 + BLOCK_K), mask=next_mask, other=0.0)
    gs = tl.sum(gate, axis=1)
    y = gs / (1.0 + tl.exp(-gs)) * tl.sum(up, axis=1)
    tl.store(act_ptr + pair.to(tl.int64) * stride_act + rows, y.to(act_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _down_pairs_kernel(act_ptr, w_ptr, weights_ptr, ids_ptr, out_ptr, num_tokens, hidden, inter, stride_act,
                       stride_we, stride_wh, stride_rt, stride_rk, stride_it, stride_ik, stride_out,
                       TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                       WAIT: tl.constexpr):
    # Tokens vary fastest (experts shared by tokens are read side by side, from L2).
    pid = tl.program_id(0)
    token = (pid % num_tokens).to(tl.int64)
    tile = pid // num_tokens
    kk = tl.arange(0, K_PAD)
    kk_ok = kk < TOP_K
    expert = tl.load(ids_ptr + token * stride_it + kk * stride_ik, mask=kk_ok, other=0).to(tl.int64)
    routing = tl.load(weights_ptr + token * stride_rt + kk * stride_rk, mask=kk_ok, other=0.0).to(tl.float32)
    rows = tile * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < hidden
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + (token * TOP_K + kk)[:, None] * stride_act + ks[None, :]  # [K_PAD, BLOCK_K]
    w_ptrs = (w_ptr + (expert * stride_we)[:, None, None] + (rows.to(tl.int64) * stride_wh)[None, :, None]
              + ks[None, None, :])  # [K_PAD, BLOCK_H, BLOCK_K]
    w_rows_ok = kk_ok[:, None, None] & row_ok[None, :, None]
    acc = tl.zeros((K_PAD, BLOCK_H, BLOCK_K), dtype=tl.float32)
    # The first weight tile needs nothing from gate_up: under PDL it loads while gate_up finishes.
    w = tl.load(w_ptrs, mask=w_rows_ok & (ks < inter)[None, None, :], other=0.0)
    if WAIT:
        gdc_wait()  # gate_up is complete and its act visible
    for k0 in range(0, inter, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=kk_ok[:, None] & ((k0 + ks) < inter)[None, :], other=0.0)
        acc += w.to(tl.float32) * a.to(tl.float32)[:, None, :]
        w = tl.load(w_ptrs + (k0 + BLOCK_K), mask=w_rows_ok & ((k0 + BLOCK_K + ks) < inter)[None, None, :],
                    other=0.0)
    # Each pair's float32 product times its routing weight, then the sum over k, rounded once.
    y = tl.sum(tl.sum(acc, axis=2) * routing[:, None], axis=0)
    tl.store(out_ptr + token * stride_out + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)
