"""Reference backend in plain torch: correct on any device; the CPU backend builds on it.

Owns nothing across steps. Attention splits the batch: sequences with a single
query row (decode) are gathered from the paged cache and attended together in
batched matmuls; sequences with several rows (prefill chunks) are attended one
by one with torch's fused attention, straight from this step's k/v when nothing
was cached before them.
"""
from __future__ import annotations

import functools

import torch

from pdserve.kernels import reference as ref
from pdserve.engine.backends.base import AttentionMetadata, HeadNorms, LoRAMapping, rotary_then_store


class TorchBackend:
    name = "torch"

    def rms_norm(self, x, weight, eps, residual=None):
        return ref.rms_norm_ref(x, weight, eps, residual)

    def rotary(self, q, k, positions, cos_sin):
        return ref.rotary_ref(q, k, positions, cos_sin)

    def silu_and_mul(self, x):
        return ref.silu_and_mul_ref(x)

    def store_kv(self, k, v, kv_layer, meta: AttentionMetadata) -> None:
        ref.store_kv_ref(k, v, kv_layer, meta.slot_mapping)

    def prepare_linear_weight(self, weight):
        return weight

    def prepare_expert_weights(self, weights):
        return weights

    def fuse_decoder_layers(self, layers):
        return None

    def run_fused_decoder(self, fused, x, positions, cos_sin, kv_cache, meta, on_layer_done):
        raise NotImplementedError(f"{self.name} has no fused decoder layers")

    def linear(self, x, weight, bias=None):
        return torch.nn.functional.linear(x, weight, bias)

    def lora_delta(self, y, x, a, b, lora: LoRAMapping, part_ends: tuple[int, ...]) -> None:
        ref.lora_delta_ref(y, x, a, b, lora.sorted_tokens, lora.slot_start, lora.slot_count, part_ends)

    def route(self, logits, top_k, renormalize):
        return ref.moe_route_ref(logits, top_k, renormalize)

    def fused_moe(self, x, w13, w2, topk_weights, topk_ids):
        return ref.fused_moe_ref(x, w13, w2, topk_weights, topk_ids)

    def prepare_int8_weight(self, weight):
        return weight

    def quant_per_token(self, x):
        return ref.quant_per_token_ref(x)

    def int8_linear(self, q, q_scale, weight, weight_scale, bias, out_dtype):
        if not (q.device.type == "cpu" and weight.dim() == 2 and _has_cpu_int_mm()):
            return ref.int8_linear_ref(q, q_scale, weight, weight_scale, bias, out_dtype)
        # the int32 sums from oneDNN instead of a float64 matmul (both exact), then the
        # reference's float64 epilogue: results equal the reference's, 3-6x sooner (measured)
        out = torch._int_mm(q, weight.t()).double()
        out.mul_(q_scale.double().reshape(-1, 1)).mul_(weight_scale.double().reshape(1, -1))
        if bias is not None:
            out.add_(bias.double())
        return out.to(out_dtype)

    def int8_linear_dynamic(self, x, amax, weight, weight_scale, bias):
        q, scale = self.quant_per_token(x)
        return self.int8_linear(q, scale, weight, weight_scale, bias, x.dtype)

    def int8_linear_silu(self, q, q_scale, weight, weight_scale, out_dtype):
        return None

    def rms_norm_quant(self, x, weight, eps, residual=None):
        return ref.rms_norm_quant_ref(x, weight, eps, residual)

    def silu_and_mul_quant(self, x):
        return ref.silu_and_mul_quant_ref(x)

    def rotary_store_kv(self, q, k, v, positions, cos_sin, kv_layer, meta: AttentionMetadata,
                        norms: HeadNorms | None = None):
        return rotary_then_store(self, q, k, v, positions, cos_sin, kv_layer, meta, norms)

    def attention(self, q, k, v, kv_layer, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        starts = meta.query_start_loc.tolist()
        decode = [b for b, n in enumerate(meta.query_lens_cpu) if n == 1]
        if decode:
            rows = torch.tensor([starts[b] for b in decode], dtype=torch.long, device=q.device)
            out[rows] = self._decode(q[rows], kv_layer, meta, decode, scale)
        for b, n in enumerate(meta.query_lens_cpu):
            if n > 1:
                s, e = starts[b], starts[b + 1]
                out[s:e] = self._prefill(q[s:e], k[s:e], v[s:e], kv_layer, meta, b, scale)
        return out

    def _prefill(self, q, k, v, kv_layer, meta, b, scale):
        seq_len, lq = meta.seq_lens_cpu[b], q.shape[0]
        mask = None
        if seq_len != lq:  # a cached prefix precedes this chunk
            k, v = ref.gather_kv_ref(kv_layer, meta.block_tables[b], seq_len)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + (seq_len - lq)
        # NOTE: 4-D inputs: with 3-D ones torch's CPU attention takes its slow unfused path
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.to(q.dtype).transpose(0, 1)[None], v.to(q.dtype).transpose(0, 1)[None],
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)

    def _decode(self, q, kv_layer, meta, seqs, scale):
        """q [B, Hq, D], one row per sequence; whole blocks gathered, padded to the longest."""
        num, bs = len(seqs), kv_layer.shape[2]
        hkv, d = kv_layer.shape[-2:]
        lens = torch.tensor([meta.seq_lens_cpu[b] for b in seqs], device=q.device)
        nb = -(-int(lens.max()) // bs)
        flat = meta.block_tables[seqs][:, :nb].long().flatten()
        # NOTE: index_select of whole blocks (one contiguous chunk each) is 2-5x faster on
        # CPU than advanced indexing per token; padding blocks are masked out below.
        k = kv_layer.select(1, 0).index_select(0, flat).view(num, nb * bs, hkv * d)
        v = kv_layer.select(1, 1).index_select(0, flat).view(num, nb * bs, hkv * d)
        keep = torch.arange(nb * bs, device=q.device)[None, :] < lens[:, None]  # [B, L]
        if hkv <= FOLD_MAX_KV_HEADS:
            return _folded_decode_attention(q, k, v, keep, scale, hkv)
        k, v = (x.view(num, nb * bs, hkv, d).transpose(1, 2) for x in (k, v))
        o = _grouped_attention(q.unsqueeze(2), k, v, keep[:, None, None, :], scale)  # [B, Hq, 1, D]
        return o.squeeze(2)


@functools.cache
def _has_cpu_int_mm() -> bool:
    """Whether this torch multiplies int8 CPU tensors with ``torch._int_mm`` (older builds: CUDA only)."""
    try:
        torch._int_mm(torch.zeros(1, 4, dtype=torch.int8), torch.zeros(4, 1, dtype=torch.int8))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


# Up to this many KV heads, decode attention multiplies against all heads of a token at
# once (below); measured 2.1x faster with 3 KV heads (SmolLM2) at batch 64 on CPU.
FOLD_MAX_KV_HEADS = 4


def _folded_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                             scale: float, hkv: int) -> torch.Tensor:
    """One query row per sequence against keys and values kept as gathered, [B, L, Hkv * D].

    Each query head is zero outside its KV head's D columns, so one batched matmul per
    side covers every head without transposing (copying) the gathered K and V; the
    product for the other heads' columns is computed and dropped. q [B, Hq, D], keep
    [B, L] (True = attend). Returns [B, Hq, D] in q.dtype; scores and softmax in float32.

    NOTE: it costs Hkv times the attention FLOPs, which on CPU is cheaper than the two
    layout copies it saves while Hkv is small (FOLD_MAX_KV_HEADS).
    """
    b, hq, d = q.shape
    group = hq // hkv
    eye = torch.eye(hkv, dtype=q.dtype, device=q.device)
    q_wide = (q.view(b, hkv, group, 1, d) * eye.view(1, hkv, 1, hkv, 1)).view(b, hq, hkv * d)
    scores = torch.matmul(q_wide, k.to(q.dtype).transpose(1, 2)).float() * scale
    scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    out = torch.matmul(probs, v.to(q.dtype)).view(b, hkv, group, hkv, d)
    return torch.diagonal(out, dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(b, hq, d)


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """Softmax attention with GQA by grouping query heads onto their KV head.

    q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D]; keep is [B or 1, 1, Lq, Lk] (True = attend). Scores and softmax in float32. Returns [B, Hq, Lq, D] in q.dtype.

    NOTE: plain matmuls beat torch's CPU SDPA here (measured: 3-12x in bf16, 1.5x
    in fp32 for decode), and keep one KV read per group.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    qg = q.reshape(b, hkv, group * lq, d)
    scores = torch.matmul(qg, k.to(q.dtype).transpose(-1, -2)).float().view(b, hkv, group, lq, lk) * scale
    scores = scores.masked_fill(~keep.unsqueeze(2), float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype).view(b, hkv, group * lq, lk)
    return torch.matmul(probs, v.to(q.dtype)).view(b, hq, lq, d)
