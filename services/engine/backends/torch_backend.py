"""Reference backend in plain torch: correct on any device, used on CPU.

Owns nothing across steps. Attention splits the batch: sequences with a single
query row (decode) are gathered from the paged cache and attended in one
batched SDPA call; sequences with several rows (prefill chunks) are attended one
by one, straight from this step's k/v when nothing was cached before them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import reference as ref
from services.engine.backends.base import AttentionMetadata


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
        seq_len = meta.seq_lens_cpu[b]
        if seq_len != q.shape[0]:  # a cached prefix precedes this chunk
            k, v = ref.gather_kv_ref(kv_layer, meta.block_tables[b], seq_len)
        return _sdpa(q, k, v, scale, causal_offset=seq_len - q.shape[0])

    def _decode(self, q, kv_layer, meta, seqs, scale):
        """q [B, Hq, D], one row per sequence; keys gathered and padded to the longest."""
        bs = kv_layer.shape[2]
        lens = torch.tensor([meta.seq_lens_cpu[b] for b in seqs], device=q.device)
        max_len = int(lens.max())
        pos = torch.arange(max_len, device=q.device)
        tables = meta.block_tables[seqs].long()
        blocks = torch.gather(tables, 1, (pos // bs).expand(len(seqs), -1).clamp(max=tables.shape[1] - 1))
        offsets = (pos % bs).expand(len(seqs), -1)
        k = kv_layer[blocks, 0, offsets]  # [B, L, Hkv, D]
        v = kv_layer[blocks, 1, offsets]
        mask = (pos[None, :] < lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
        qh = q.unsqueeze(2)  # [B, Hq, 1, D]
        kh, vh = k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.squeeze(2)


def _sdpa(q, k, v, scale, causal_offset: int):
    """q [Lq, Hq, D] are the last Lq of Lk = Lq + causal_offset positions."""
    qh = q.transpose(0, 1)
    kh, vh = k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)
    lq, lk = q.shape[0], k.shape[0]
    # NOTE: an explicit mask is faster than is_causal on CPU in torch 2.13 (measured).
    mask = torch.arange(lk, device=q.device)[None, :] <= (torch.arange(lq, device=q.device)[:, None] + causal_offset)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(0, 1)
