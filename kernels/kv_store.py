"""KV store: a Triton kernel that writes new keys and values into the paged KV cache.

Owns: ``store_kv``, the scatter of this step's K/V rows into their cache slots.
Stateless. Numerics and semantics follow ``reference.store_kv_ref``: a token's
slot is ``block_id * block_size + offset``; slots < 0 (padding) are skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter k, v [T, Hkv, D] into kv_layer [blocks, 2, block_size, Hkv, D] at slot_mapping [T].

    k and v may be strided views (for example slices of a fused QKV output) as long
    as their last dim is contiguous; values are cast to the cache dtype.
    """
    if k.shape != v.shape or k.dim() != 3 or kv_layer.dim() != 5:
        raise ValueError(f"expected k, v [T, Hkv, D] and kv_layer [blocks, 2, block_size, Hkv, D], "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}, {tuple(kv_layer.shape)}")
    if tuple(k.shape[1:]) != tuple(kv_layer.shape[3:]):
        raise ValueError(f"k heads/head_dim {tuple(k.shape[1:])} != cache {tuple(kv_layer.shape[3:])}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [{k.shape[0]}], got {tuple(slot_mapping.shape)}")
    if kv_layer.stride(4) != 1:
        raise ValueError("kv_layer's last dim must be contiguous")
    k = k if k.stride(2) == 1 else k.contiguous()
    v = v if v.stride(2) == 1 else v.contiguous()
    tokens, heads, head_dim = k.shape
    if tokens == 0:
        return
    heads_pad, dim_pad = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim)
    _store_kv_kernel[(tokens,)](
        k, v, kv_layer, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        HEADS=heads, HEAD_DIM=head_dim, HEADS_PAD=heads_pad, DIM_PAD=dim_pad,
        BLOCK_SIZE=kv_layer.shape[2],
        num_warps=max(1, min(8, heads_pad * dim_pad // 512)),
    )


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kv_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ckv, stride_cs, stride_ch,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, DIM_PAD)
    mask = (offs_h[:, None] < HEADS) & (offs_d[None, :] < HEAD_DIM)
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = (kv_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
           + offs_h[:, None] * stride_ch + offs_d[None, :])
    out_ty = kv_ptr.dtype.element_ty
    tl.store(dst, k.to(out_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(out_ty), mask=mask)
