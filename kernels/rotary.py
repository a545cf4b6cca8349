"""Rotary position embedding: the cos/sin cache builder and Triton kernels applying it.

Owns: the rotary kernels; ``build_cos_sin_cache`` (built once by the engine at load time, with any
llama3 frequency scaling folded in), ``rotary`` (neox-style rotate-half on q
and k in one launch) and ``rotary_store_kv`` (the same in place, plus the KV
store of ``kv_store.store_kv`` in the same launch, and optionally the per-head RMSNorm
of q and k before the rotation (Qwen3's q_norm / k_norm): two or three kernels less
per layer, which matters in small decode steps). Stateless. Numerics follow
``reference.rms_norm_ref``, ``reference.rotary_ref`` and ``reference.store_kv_ref``,
with the rotation computed in float32 and rounded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.reference import build_cos_sin_cache  # noqa: F401  (re-exported)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, *,
           out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding of q [T, Hq, D] and k [T, Hkv, D] at positions [T].

    Args:
        cos_sin: [max_pos, D] float32 from ``build_cos_sin_cache``.
        out: optional (q_out, k_out) buffers; passing (q, k) rotates in place.

    Returns:
        (q_rot, k_rot) in the dtypes of q and k.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [T, Hq, D] and k [T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    head_dim = q.shape[2]
    if head_dim % 2 or cos_sin.dim() != 2 or cos_sin.shape[1] != head_dim:
        raise ValueError(f"cos_sin must be [max_pos, {head_dim}] with an even head_dim, got {tuple(cos_sin.shape)}")
    q = q if q.stride(2) == 1 else q.contiguous()
    k = k if k.stride(2) == 1 else k.contiguous()
    cos_sin = cos_sin if cos_sin.stride(1) == 1 else cos_sin.contiguous()
    q_out, k_out = out if out is not None else (torch.empty_like(q), torch.empty_like(k))
    for src, dst in ((q, q_out), (k, k_out)):
        if dst.shape != src.shape or dst.dtype != src.dtype or dst.stride(2) != 1:
            raise ValueError(f"rotary output must be {tuple(src.shape)} {src.dtype} with a contiguous last dim")
    tokens = q.shape[0]
    if tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(tokens,)](
        q, k, q_out, k_out, positions, cos_sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin.stride(0),
        Q_HEADS=q.shape[1], K_HEADS=k.shape[1],
        Q_HEADS_PAD=triton.next_power_of_2(q.shape[1]), K_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        num_warps=4,
    )
    return q_out, k_out


@triton.jit
def _norm_heads(x1, x2, w_ptr, eps, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """RMSNorm of each head row [HEADS_PAD, 2 * HALF] held as its halves (float32, zero past
    the end), rounded where ``rms_norm_ref`` rounds (to w's dtype, the rows' own): the normed
    row, then its product with w."""
    ty = w_ptr.dtype.element_ty
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
    offs_d = tl.arange(0, HALF_PAD)
    w1 = tl.load(w_ptr + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
    h1 = (x1 * rstd[:, None]).to(ty).to(tl.float32)
    h2 = (x2 * rstd[:, None]).to(ty).to(tl.float32)
    return (w1[None, :] * h1).to(ty).to(tl.float32), (w2[None, :] * h2).to(ty).to(tl.float32)


@triton.jit
def _rotate_heads(src, dst, stride_src, stride_dst, cos, sin,
                  HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                  w_ptr, eps, NORM: tl.constexpr):
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    mask = (offs_h[:, None] < HEADS) & (offs_d[None, :] < HALF)
    src_1 = src + offs_h[:, None] * stride_src + offs_d[None, :]
    x1 = tl.load(src_1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_1 + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        x1, x2 = _norm_heads(x1, x2, w_ptr, eps, HALF, HALF_PAD)
    dst_1 = dst + offs_h[:, None] * stride_dst + offs_d[None, :]
    ty = dst.dtype.element_ty
    tl.store(dst_1, (x1 * cos[None, :] - x2 * sin[None, :]).to(ty), mask=mask)
    tl.store(dst_1 + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(ty), mask=mask)


@triton.jit
def _cos_sin(cs_ptr, pos_ptr, t, stride_cs, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """cos and sin [HALF_PAD] (float32, zero past HALF) at token t's position."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, HALF_PAD)
    cos = tl.load(cs_ptr + pos * stride_cs + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cs_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
    Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(cs_ptr, pos_ptr, t, stride_cs, HALF, HALF_PAD)
    _rotate_heads(q_ptr + t * stride_qt, qo_ptr + t * stride_qot, stride_qh, stride_qoh, cos, sin,
                  Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD, q_ptr, 0.0, False)
    _rotate_heads(k_ptr + t * stride_kt, ko_ptr + t * stride_kot, stride_kh, stride_koh, cos, sin,
                  K_HEADS, K_HEADS_PAD, HALF, HALF_PAD, k_ptr, 0.0, False)


def takes_head_norms(q: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor) -> bool:
    """Whether ``rotary_store_kv`` can apply these head-norm weights to q: contiguous [D] of q's dtype."""
    return all(w.shape == (q.shape[-1],) and w.dtype == q.dtype and w.is_contiguous() for w in (q_weight, k_weight))


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor,
                    head_norms: tuple[torch.Tensor, torch.Tensor, float] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place, and write the rotated k and v
    [T, Hkv, D] into kv_layer [blocks, 2, block_size, Hkv, D] at slot_mapping [T]
    (slots < 0 are not stored). q, k and v may be strided views with a contiguous
    last dim (e.g. of a fused QKV output). ``head_norms`` (q weight [D], k weight [D],
    eps): each head of q and k is RMS-normed first, as ``rms_norm_ref`` of the head rows.
    Returns (q, k)."""
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [T, Hq, D], k and v [T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if kv_layer.dim() != 5 or tuple(k.shape[1:]) != tuple(kv_layer.shape[3:]) or kv_layer.stride(4) != 1:
        raise ValueError(f"kv_layer must be [blocks, 2, block_size, {k.shape[1]}, {k.shape[2]}] with a "
                         f"contiguous last dim, got {tuple(kv_layer.shape)}")
    head_dim = q.shape[2]
    if head_dim % 2 or cos_sin.dim() != 2 or cos_sin.shape[1] != head_dim or cos_sin.stride(1) != 1:
        raise ValueError(f"cos_sin must be [max_pos, {head_dim}] (contiguous rows) with an even head_dim, "
                         f"got {tuple(cos_sin.shape)}")
    if slot_mapping.shape != (q.shape[0],) or positions.shape != (q.shape[0],):
        raise ValueError(f"positions and slot_mapping must be [{q.shape[0]}]")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("q, k and v need a contiguous last dim (they are rotated in place)")
    q_weight, k_weight, eps = head_norms if head_norms is not None else (q, k, 0.0)
    if head_norms is not None and not takes_head_norms(q, q_weight, k_weight):
        raise ValueError(f"head norm weights must be contiguous [{head_dim}] of {q.dtype}")
    tokens = q.shape[0]
    if tokens == 0:
        return q, k
    half = head_dim // 2
    k_heads_pad = triton.next_power_of_2(k.shape[1])
    _rotary_store_kernel[(tokens,)](
        q, k, v, positions, cos_sin, slot_mapping, kv_layer, q_weight, k_weight, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        NORM=head_norms is not None, Q_HEADS=q.shape[1], K_HEADS=k.shape[1],
        Q_HEADS_PAD=triton.next_power_of_2(q.shape[1]), K_HEADS_PAD=k_heads_pad,
        HALF=half, HALF_PAD=triton.next_power_of_2(half), DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=kv_layer.shape[2],
        num_warps=4,
    )
    return q, k


@triton.jit
def _rotary_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr, kv_ptr, qw_ptr, kw_ptr, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_cb, stride_ckv, stride_cslot, stride_ch, NORM: tl.constexpr,
    Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(cs_ptr, pos_ptr, t, stride_cs, HALF, HALF_PAD)
    q_row = q_ptr + t * stride_qt
    _rotate_heads(q_row, q_row, stride_qh, stride_qh, cos, sin, Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD, qw_ptr, eps,
                  NORM)
    # k: load once, (norm,) rotate, store in place and (unless padding) into the cache
    offs = tl.arange(0, HALF_PAD)
    offs_h = tl.arange(0, K_HEADS_PAD)
    mask = (offs_h[:, None] < K_HEADS) & (offs[None, :] < HALF)
    k_1 = k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs[None, :]
    x1 = tl.load(k_1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(k_1 + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        x1, x2 = _norm_heads(x1, x2, kw_ptr, eps, HALF, HALF_PAD)
    r1 = x1 * cos[None, :] - x2 * sin[None, :]
    r2 = x2 * cos[None, :] + x1 * sin[None, :]
    k_ty = k_ptr.dtype.element_ty
    tl.store(k_1, r1.to(k_ty), mask=mask)
    tl.store(k_1 + HALF, r2.to(k_ty), mask=mask)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        c_ty = kv_ptr.dtype.element_ty
        # NOTE: the cached k is rounded from float32 once, like rotary then store_kv of the
        # same dtype (the rotated k above is already in k's dtype; round-trip it to match).
        dst = (kv_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cslot
               + offs_h[:, None] * stride_ch + offs[None, :])
        tl.store(dst, r1.to(k_ty).to(c_ty), mask=mask)
        tl.store(dst + HALF, r2.to(k_ty).to(c_ty), mask=mask)
        offs_d = tl.arange(0, DIM_PAD)
        v_mask = (offs_h[:, None] < K_HEADS) & (offs_d[None, :] < 2 * HALF)
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=v_mask)
        v_dst = (kv_ptr + (slot // BLOCK_SIZE) * stride_cb + stride_ckv + (slot % BLOCK_SIZE) * stride_cslot
                 + offs_h[:, None] * stride_ch + offs_d[None, :])
        tl.store(v_dst, v.to(c_ty), mask=v_mask)
