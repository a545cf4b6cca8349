"""Pure-torch reference implementations of every kernel pdserve uses.

Owns: the numerical definition of each fused op. The Triton kernels in this
package are tested against these functions, and the engine's CPU backend runs
them directly. No state, no lifecycle: plain functions over tensors.

KV cache layout (one layer): ``kv_layer[num_blocks, 2, block_size, num_kv_heads, head_dim]``
where index 0 of dim 1 is K and 1 is V. A token's *slot* is
``block_id * block_size + offset``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch


def build_cos_sin_cache(head_dim: int, max_pos: int, base: float,
                        rope_scaling: Mapping[str, Any] | None = None) -> torch.Tensor:
    """[max_pos, head_dim] float32: cos of the head_dim/2 frequencies, then their sin.

    Matches HF transformers' default and ``llama3`` rope initialisation (the
    attention factor is 1.0 for both, so it is not applied).

    Args:
        rope_scaling: None, or the model's rope-scaling dict; ``rope_type`` (or
            legacy ``type``) "default" or "llama3". llama3 needs ``factor``,
            ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position_embeddings``.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = "default"
    if rope_scaling:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
    elif rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: 'default', 'llama3')")
    freqs = torch.arange(max_pos, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling, step for step as HF ``_compute_llama3_parameters``."""
    missing = [key for key in ("factor", "low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings") if key not in scaling]
    if missing:
        raise ValueError(f"llama3 rope_scaling is missing {missing}")
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with an optional residual add first.

    Returns (normed, new_residual); new_residual is x (+ residual), the value the
    next residual add must use. Computed in float32, cast back to x.dtype (as HF Llama).
    """
    if residual is not None:
        x = x + residual
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(x.dtype), x


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x[..., :d] is the gate, x[..., d:] the up projection: silu(gate) * up."""
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]


def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) rotary embedding, as HF Llama applies it.

    Args:
        q: [T, Hq, D]; k: [T, Hkv, D]; positions: [T] int64.
        cos_sin: [max_pos, D] float32; first D/2 columns cos, last D/2 sin
            (of the D/2 distinct frequencies).
    """
    half = q.shape[-1] // 2
    cs = cos_sin[positions]
    cos = torch.cat([cs[:, :half], cs[:, :half]], dim=-1)[:, None, :]
    sin = torch.cat([cs[:, half:], cs[:, half:]], dim=-1)[:, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half], x[..., half:]
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x * cos.to(x.dtype)) + (rotated * sin.to(x.dtype))

    return rot(q), rot(k)


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Scatter k, v [T, Hkv, D] into kv_layer at slot_mapping [T] (slots < 0 are skipped)."""
    block_size = kv_layer.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    kv_layer[blocks, 0, offsets] = k[keep].to(kv_layer.dtype)
    kv_layer[blocks, 1, offsets] = v[keep].to(kv_layer.dtype)


def gather_kv_ref(kv_layer: torch.Tensor, block_table: torch.Tensor,
                  seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [seq_len, Hkv, D] of one sequence, read through its block table."""
    block_size = kv_layer.shape[2]
    n_blocks = (seq_len + block_size - 1) // block_size
    blocks = kv_layer[block_table[:n_blocks].long()]  # [n, 2, bs, H, D]
    k = blocks[:, 0].reshape(-1, *blocks.shape[-2:])[:seq_len]
    v = blocks[:, 1].reshape(-1, *blocks.shape[-2:])[:seq_len]
    return k, v


def paged_attention_ref(q: torch.Tensor, kv_layer: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Causal attention of variable-length query chunks over a paged KV cache.

    Sequence b owns queries q[query_start_loc[b]:query_start_loc[b+1]], which are
    the *last* tokens of its seq_lens[b] context (so a chunk may start mid-sequence,
    and a decode step is a chunk of one). The KV of every context token, the new
    ones included, must already be in the cache. Accumulates in float32.

    Returns: [T, Hq, D] in q.dtype.
    """
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        s, e = qsl[b], qsl[b + 1]
        if e == s:
            continue
        k, v = gather_kv_ref(kv_layer, block_tables[b], seq_len)
        out[s:e] = _causal_attention(q[s:e], k, v, scale)
    return out


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q [Lq, Hq, D] are the last Lq positions of k/v [Lk, Hkv, D]."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    qf = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, Lq, Lk]
    q_pos = torch.arange(lk - lq, lk).unsqueeze(1)
    k_pos = torch.arange(lk).unsqueeze(0)
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).transpose(0, 1).to(q.dtype)


def moe_route_ref(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's top-k: (weights float32 [T, K], expert ids int64 [T, K]) of logits [T, E];
    softmax in float32, the K largest in decreasing order, divided by their sum if
    ``renormalize``."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """The experts of a sparse MLP, summed over each token's top-k routing.

    out[t] = sum_k topk_weights[t, k] * (silu(x[t] @ w13[e, :I].T) * (x[t] @ w13[e, I:].T)) @ w2[e].T
    with e = topk_ids[t, k]; x [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I],
    topk_weights [T, K], topk_ids [T, K] (a token never has the same expert twice).
    Computed in float32 (or x's dtype if wider); the SiLU-and-mul intermediate is rounded
    to x.dtype before the down projection, the weighted sum over k once at the end.

    Returns: [T, H] in x.dtype.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    inter = w13.shape[1] // 2
    acc = torch.zeros((x.shape[0], w2.shape[1]), dtype=compute, device=x.device)
    experts = topk_ids.reshape(-1).long()
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=w13.shape[0]).tolist()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        tokens = pairs // topk_ids.shape[1]
        h = x[tokens].to(compute) @ w13[e].to(compute).T
        act = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype)
        y = act.to(compute) @ w2[e].to(compute).T
        acc.index_add_(0, tokens, y * topk_weights.reshape(-1)[pairs, None].to(compute))
    return acc.to(x.dtype)


# ---- W8A8 (int8 weights and activations) --------------------------------------------
# Activations are quantized per token (row), symmetric, dynamically at run time:
# scale = max|x_row| / 127, q = round(x / scale) in [-127, 127]. A zero row gets
# scale 1 (q = 0) so nothing divides by zero. Weights arrive already quantized
# (int8 [N, K]) with one float32 scale per output channel.

INT8_MAX = 127.0


def quant_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (q int8 [T, K], scale float32 [T, 1]) with x ~= q * scale."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_linear_ref(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [T, K] int8 @ weight [N, K] int8 .T) exactly (int32 sums), times q_scale [T, 1] and
    weight_scale [N] (or [N, 1]), plus bias [N]; out_dtype [T, N]. float64 keeps the
    integer sums exact on any device."""
    acc = q.double() @ weight.double().t()
    out = acc * q_scale.double().reshape(-1, 1) * weight_scale.double().reshape(1, -1)
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


def rms_norm_quant_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rms_norm_ref`` whose output is quantized per token: (q, scale, x + residual).
    The normed row is rounded to x's dtype before quantizing, as the unfused path does."""
    normed, res = rms_norm_ref(x, weight, eps, residual)
    q, scale = quant_per_token_ref(normed)
    return q, scale, res


def silu_and_mul_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu_and_mul_ref`` whose output [T, I] is quantized per token: (q, scale)."""
    return quant_per_token_ref(silu_and_mul_ref(x))


# ---- LoRA: many adapters in one batch -------------------------------------------------
# Each token t of a step has an adapter slot token_slots[t] in [0, S), or -1: the base
# model (no delta; also a captured graph's padding rows). The adapters of one layer part
# are stacked: a [S, R, K] (each adapter's A zero-padded to R rows), b [S, N, R] (its B,
# zero-padded to R columns and multiplied by its scaling). The kernels take the tokens
# grouped by slot (``group_by_slot``): slot s's tokens are
# sorted_tokens[slot_start[s]:slot_start[s] + slot_count[s]], in step order, slot 0's first;
# the base tokens come last and belong to no slot.

def group_by_slot(token_slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """token_slots [T] (values in [-1, num_slots)) -> (sorted_tokens [T], slot_start [S], slot_count [S]), int32."""
    key = torch.where(token_slots < 0, num_slots, token_slots.long())
    sorted_tokens = torch.argsort(key, stable=True)
    count = torch.bincount(key, minlength=num_slots + 1)[:num_slots]
    start = torch.cumsum(count, 0) - count
    return sorted_tokens.to(torch.int32), start.to(torch.int32), count.to(torch.int32)


def lora_delta_ref(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sorted_tokens: torch.Tensor,
                   slot_start: torch.Tensor, slot_count: torch.Tensor, part_ends: tuple[int, ...] | None = None) -> None:
    """In place: ``y[t, part p] += (x[t] @ a[s, rows of p].T) @ b[s, part p].T`` for every token t
    of every slot s (``group_by_slot``'s layout) and every part p; the rows of no slot are left
    as they are.

    x [T, K]; a [S, P * R, K] (part p's A in rows [p R, (p + 1) R)); b [S, N, R] (part p's B in
    rows [part_ends[p - 1], part_ends[p])); y [T, N]; part_ends default (N,): one part. Two
    matmuls in x's dtype (the first product rounded to it, as torch rounds it), the delta
    rounded to y's dtype before the add.

    NOTE: reads the slot counts on the host (a device sync on accelerators): not for graphs.
    """
    ends = tuple(part_ends) if part_ends is not None else (y.shape[-1],)
    rank = a.shape[1] // len(ends)
    for s, (start, n) in enumerate(zip(slot_start.tolist(), slot_count.tolist())):
        if n:
            rows = sorted_tokens[start:start + n].long()
            shrunk = x.index_select(0, rows) @ a[s].t()  # every part's shrink in one matmul
            for p, (lo, hi) in enumerate(zip((0,) + ends[:-1], ends)):
                delta = shrunk[:, p * rank:(p + 1) * rank] @ b[s, lo:hi].t()
                y[:, lo:hi].index_add_(0, rows, delta.to(y.dtype))
