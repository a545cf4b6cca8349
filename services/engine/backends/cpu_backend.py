"""CPU backend: the torch reference backend with pdserve's compiled CPU kernels where they apply.

Owns: the loaded ``CpuKernels`` (built once, when the platform makes the backend).
For float32 and bfloat16 models, attention (decode rows and prefill chunks of a
mixed batch, in one call) is the compiled kernel, which reads K and V in place
through the block tables (no gather), and RMSNorm, SiLU-and-multiply and
rotary-then-store run as single fused passes; so do the W8A8 ops (per-token int8
quantization, alone or fused into RMSNorm and SiLU-and-multiply, and the int8 GEMM
for weights packed once at load by ``CpuKernels.prepack_int8_weight``). Float32 and
bfloat16 linear layers multiply with the compiled GEMM over weights packed once at
load (``prepare_linear_weight``), where the build vectorizes that dtype; a model of
such plain layers runs each decoder layer as one compiled call (``fuse_decoder_layers``),
LoRA-wrapped projections included (the call adds their deltas). The LoRA delta of a
wrapped layer run op by op is one compiled call too (every adapter slot and part).
Every case the kernels do not cover runs the torch code it inherits.
"""
from __future__ import annotations

import torch

from pdserve.kernels.cpu import CpuKernels
from pdserve.kernels.cpu_layer import FusedDecoder
from pdserve.engine.backends.base import AttentionMetadata, HeadNorms, LoRAMapping, norm_heads
from pdserve.engine.backends.torch_backend import TorchBackend


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, kernels: CpuKernels):
        self.kernels = kernels

    def _rows(self, *xs: torch.Tensor) -> bool:
        """All 2-D with contiguous rows, of one dtype the kernels take."""
        first = xs[0].dtype
        return all(x.dim() == 2 and x.stride(1) == 1 and x.dtype == first for x in xs) and self.kernels.supports(first)

    def rms_norm(self, x, weight, eps, residual=None):
        if not self._rows(x, weight.view(1, -1), *(() if residual is None else (residual,))):
            return super().rms_norm(x, weight, eps, residual)
        return self.kernels.rms_norm(x, weight, eps, residual)

    def prepare_linear_weight(self, weight):
        return self.kernels.prepack_linear_weight(weight)

    def fuse_decoder_layers(self, layers):
        """One compiled call per layer (``kernels/cpu_layer.py``) where every layer's weights are
        packed in one vectorized dtype; else None."""
        if not layers or not all(FusedDecoder.supports(self.kernels, layer) for layer in layers):
            return None
        return FusedDecoder(self.kernels, layers)

    def run_fused_decoder(self, fused, x, positions, cos_sin, kv_cache, meta: AttentionMetadata, on_layer_done):
        return fused.run(x, positions, cos_sin, kv_cache, meta.slot_mapping, meta.query_start_loc, meta.seq_lens,
                         meta.block_tables, on_layer_done)

    def linear(self, x, weight, bias=None):
        """The compiled GEMM for a weight packed at load (``CpuKernels.prepack_linear_weight``), for
        every number of rows; a plain [N, K] weight runs torch's ``F.linear``."""
        if weight.dim() == 2:
            return super().linear(x, weight, bias)
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if rows.stride(1) != 1:
            rows = rows.contiguous()
        out = self.kernels.linear(rows, weight, bias)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[1])

    def lora_delta(self, y, x, a, b, lora: LoRAMapping, part_ends: tuple[int, ...]) -> None:
        """The compiled delta (every slot and part of the layer in one call, each slot only up to
        its adapter's rank) where y, x, a and b share a dtype the kernels take, rows contiguous
        and the stacks dense; else the torch reference (a few small ops per slot and part)."""
        if not (self._rows(y, x) and a.dtype == b.dtype == y.dtype and a.is_contiguous() and b.is_contiguous()):
            return super().lora_delta(y, x, a, b, lora, part_ends)
        self.kernels.lora_delta(y, x, a, b, lora.sorted_tokens, lora.slot_start, lora.slot_count, part_ends,
                                slot_rank=lora.slot_rank)

    def prepare_expert_weights(self, weights):
        return self.kernels.prepack_expert_weights(weights)

    def fused_moe(self, x, w13, w2, topk_weights, topk_ids):
        """The (token, expert) pairs sorted by expert and gathered once; with packed experts
        (``prepare_expert_weights``) every expert's two GEMMs and the SiLU-and-mul in one
        compiled call, else per expert with pairs two matmuls in the model's dtype and the
        fused SiLU-and-mul on a contiguous slice; the routing weights and the sum over the
        top-k once at the end (float32)."""
        tokens, top_k = topk_ids.shape
        experts = topk_ids.reshape(-1)
        order = torch.argsort(experts, stable=True)
        counts = torch.bincount(experts, minlength=w13.shape[0])
        pair_token = order // top_k
        rows = x[pair_token]
        if self.kernels.is_packed_experts(w13):
            offsets = torch.zeros(w13.shape[0] + 1, dtype=torch.int32)
            torch.cumsum(counts, 0, out=offsets[1:])
            out_rows = self.kernels.moe_experts(rows.contiguous(), offsets, w13, w2)
        else:
            out_rows = self._experts_one_by_one(rows, counts.tolist(), w13, w2)
        weighted = out_rows.float() * topk_weights.reshape(-1)[order, None].float()
        hidden = w2.shape[1]
        return torch.zeros((tokens, hidden), dtype=torch.float32).index_add_(0, pair_token, weighted).to(x.dtype)

    def _experts_one_by_one(self, rows, counts, w13, w2):
        out_rows = torch.empty((rows.shape[0], w2.shape[1]), dtype=rows.dtype)
        start = 0
        for expert in (e for e, n in enumerate(counts) if n):
            end = start + counts[expert]
            act = self.silu_and_mul(torch.mm(rows[start:end], w13[expert].t()))
            torch.mm(act, w2[expert].t(), out=out_rows[start:end])
            start = end
        return out_rows

    def silu_and_mul(self, x):
        if not self._rows(x):
            return super().silu_and_mul(x)
        return self.kernels.silu_and_mul(x)

    # ---- W8A8 ------------------------------------------------------------------------

    def prepare_int8_weight(self, weight):
        return self.kernels.prepack_int8_weight(weight) if weight.device.type == "cpu" else weight

    def quant_per_token(self, x):
        if not self._rows(x):
            return super().quant_per_token(x)
        return self.kernels.quant_per_token(x)

    def int8_linear(self, q, q_scale, weight, weight_scale, bias, out_dtype):
        """The compiled GEMM for a weight packed at load (``CpuKernels.prepack_int8_weight``);
        a plain [N, K] weight (also what prepacking leaves without a vector int8 GEMM) runs the
        inherited torch path."""
        if not self.kernels.is_packed_int8(weight):
            return super().int8_linear(q, q_scale, weight, weight_scale, bias, out_dtype)
        if q.stride(1) != 1:
            q = q.contiguous()
        dtype = out_dtype if self.kernels.supports(out_dtype) else torch.float32
        return self.kernels.int8_linear(q, q_scale, weight, weight_scale, bias, dtype).to(out_dtype)

    def rms_norm_quant(self, x, weight, eps, residual=None):
        if not self._rows(x, weight.view(1, -1), *(() if residual is None else (residual,))):
            return super().rms_norm_quant(x, weight, eps, residual)
        return self.kernels.rms_norm_quant(x, weight, eps, residual)

    def silu_and_mul_quant(self, x):
        if not self._rows(x):
            return super().silu_and_mul_quant(x)
        return self.kernels.silu_and_mul_quant(x)

    def rotary_store_kv(self, q, k, v, positions, cos_sin, kv_layer, meta: AttentionMetadata,
                        norms: HeadNorms | None = None):
        q, k = norm_heads(self, q, k, norms)
        heads_packed = all(x.stride(2) == 1 and x.stride(1) == x.shape[2] for x in (q, k, v))
        if not (heads_packed and q.dtype == k.dtype == v.dtype == kv_layer.dtype and self.kernels.supports(q.dtype)):
            return super().rotary_store_kv(q, k, v, positions, cos_sin, kv_layer, meta)
        return self.kernels.rotary_store_kv(q, k, v, positions, cos_sin, kv_layer, meta.slot_mapping)

    def attention(self, q, k, v, kv_layer, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if q.dtype != kv_layer.dtype or not self.kernels.supports(q.dtype) or q.stride(2) != 1:
            return super().attention(q, k, v, kv_layer, meta, scale)
        return self.kernels.paged_attention(q, kv_layer, meta.query_start_loc, meta.seq_lens,
                                            meta.block_tables, scale)
