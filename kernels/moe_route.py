"""Mixture of experts: the router's top-k, in one launch.

Owns: ``moe_route``, the softmax of each token's router logits in float32, its top-k
experts and their weights (renormalised to sum to 1 where the model says so), as
``reference.moe_route_ref`` computes them with torch's softmax, topk and division. Stateless;
allocates its two outputs. At a decode step torch spends four or five launches on this per
MoE layer (softmax, topk, sum, division); a 48-layer model pays them 48 times a step.

One program per token holds the token's logits in registers: the softmax, then K rounds
of (max, argmax, mask). Experts are chosen on the logits (the same order as the
probabilities, without the ties that rounding the probabilities can make); a tie goes to
the lower expert id. Never waits for the host, so a call can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 1024  # one program holds a token's logits in registers


def moe_route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (any float dtype, last dim contiguous) -> (weights float32 [T, K], ids int64
    [T, K]), each token's experts in decreasing order of weight."""
    if logits.dim() != 2 or logits.stride(-1) != 1 or not logits.dtype.is_floating_point:
        raise ValueError(f"moe_route: logits must be 2-D float rows with a contiguous last dim, "
                         f"got {tuple(logits.shape)} {logits.dtype} strides {logits.stride()}")
    tokens, experts = logits.shape
    if not 1 <= top_k <= experts or experts > MAX_EXPERTS:
        raise ValueError(f"moe_route: top_k={top_k} of {experts} experts (at most {MAX_EXPERTS})")
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((tokens, top_k), dtype=torch.int64, device=logits.device)
    if tokens == 0:
        return weights, ids
    e_pad = triton.next_power_of_2(experts)
    _route_kernel[(tokens,)](logits, weights, ids, experts, logits.stride(0), TOP_K=top_k,
                             K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, RENORMALIZE=renormalize,
                             num_warps=1 if e_pad <= 128 else 4)
    return weights, ids


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, num_experts, stride_t, TOP_K: tl.constexpr,
                  K_PAD: tl.constexpr, E_PAD: tl.constexpr, RENORMALIZE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E_PAD)
    ok = e < num_experts
    x = tl.load(logits_ptr + token * stride_t + e, mask=ok, other=-float("inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = p / tl.sum(p, axis=0)
    kk = tl.arange(0, K_PAD)
    w = tl.zeros((K_PAD,), dtype=tl.float32)
    ids = tl.zeros((K_PAD,), dtype=tl.int64)
    # a chosen expert drops to -inf; a -inf logit is lifted to the lowest finite float, so it
    # stays above every chosen one (as topk, which still returns -inf logits when it must)
    left = tl.where(ok, tl.maximum(x, -3.4028234663852886e38), -float("inf"))
    for k in tl.static_range(TOP_K):
        best = tl.argmax(left, axis=0, tie_break_left=True)
        hit = e == best
        w = tl.where(kk == k, tl.sum(tl.where(hit, p, 0.0), axis=0), w)
        ids = tl.where(kk == k, best.to(tl.int64), ids)
        left = tl.where(hit, -float("inf"), left)
    if RENORMALIZE:
        w = w / tl.sum(w, axis=0)
    out = token * TOP_K + kk
    tl.store(weights_ptr + out, w, mask=kk < TOP_K)
    tl.store(ids_ptr + out, ids, mask=kk < TOP_K)


__all__ = ["MAX_EXPERTS", "moe_route"]
