"""CUDA backend: the Triton kernels of ``kernels/`` behind the ``Backend`` interface.

Owns nothing across steps. Every op is one kernel launch with no host
synchronisation, so a decode step can be captured in a CUDA graph. Two ops work in
place where the model no longer needs the input: the residual add of ``rms_norm``
(into the residual it was given) and ``rotary`` / ``rotary_store_kv`` (into the
q/k views of the QKV projection).
"""
from __future__ import annotations

import torch

from pdserve.kernels import (activation, attention, gemv, int8, int8_gemv, int8_gemv_fused, kv_store, lora, moe,
                             moe_route, norm, rotary)
from pdserve.kernels import reference as ref
from pdserve.engine.backends.base import AttentionMetadata, HeadNorms, LoRAMapping, rotary_then_store

GEMV_MAX_ROWS = 2  # int8 rows at or below which the W8A8 linear runs the dp4a GEMV
# NOTE: rows at or below which the GEMVs take over the activation quantization around them
# (kernels/int8_gemv_fused.py): at one row they are faster than the separate passes; at two,
# the repeated quantization work made o_proj 0.89x (H100, bench.int8_gemv_fused).
FUSED_GEMV_MAX_ROWS = 1
# from this many rows the gate_up GEMM applies SiLU-and-mul in its epilogue (int8.int8_gemm_silu:
# prefill-sized tiles without K slices); between the two, the separate SiLU-and-mul-quantize pass
SILU_GEMM_MIN_ROWS = 65


class TritonBackend:
    name = "triton"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 2:
            return norm.rms_norm(x, weight, eps, residual, residual_out=residual)
        # per-head norms (q_norm / k_norm) see [T, H, D]
        shape = x.shape
        flat_res = None if residual is None else residual.reshape(-1, shape[-1])
        out, res = norm.rms_norm(x.reshape(-1, shape[-1]), weight, eps, flat_res)
        return out.view(shape), res.view(shape)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            return rotary.rotary(q, k, positions, cos_sin)
        return rotary.rotary(q, k, positions, cos_sin, out=(q, k))

    def prepare_expert_weights(self, weights: torch.Tensor) -> torch.Tensor:
        return weights

    def prepare_linear_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def fuse_decoder_layers(self, layers):
        return None

    def run_fused_decoder(self, fused, x, positions, cos_sin, kv_cache, meta, on_layer_done):
        raise NotImplementedError(f"{self.name} has no fused decoder layers")

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # NOTE: a single row (a batch-1 decode step) in 16-bit: our GEMV streams the weight
        # faster than cuBLAS (kernels/gemv.py); float32 keeps cuBLAS's summation order.
        if (x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
                and x.stride(-1) == 1 and weight.stride(-1) == 1):
            out = gemv.gemv(x, weight)
            return out if bias is None else out + bias
        return torch.nn.functional.linear(x, weight, bias)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return activation.silu_and_mul(x)

    def lora_delta(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   mapping: LoRAMapping, part_ends: tuple[int, ...]) -> None:
        # NOTE: reads only the grouped tokens on the device (two launches per layer, grids fixed
        # by the shapes): a decode step with adapters is captured and replayed like any other.
        lora.lora_delta(y, x if x.stride(-1) == 1 else x.contiguous(), a, b, mapping.sorted_tokens,
                        mapping.slot_start, mapping.slot_count, part_ends)

    def route(self, logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # NOTE: one launch where torch's softmax, topk and renormalisation take four or five
        if logits.stride(-1) == 1 and logits.shape[-1] <= moe_route.MAX_EXPERTS:
            return moe_route.moe_route(logits, top_k, renormalize)
        return ref.moe_route_ref(logits, top_k, renormalize)

    def fused_moe(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
        return moe.fused_moe(x, w13, w2, topk_weights, topk_ids)

    # W8A8: kernels/int8.py; no host sync, so a quantized decode step can be captured too.
    def prepare_int8_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def quant_per_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return int8.quant_per_token(x)

    def int8_linear(self, q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        if q.shape[0] <= GEMV_MAX_ROWS:  # NOTE: dp4a GEMV streams the weight faster at 1-2 rows (kernels/int8_gemv.py)
            return int8_gemv.int8_gemv(q, q_scale, weight, weight_scale, bias, out_dtype)
        return int8.int8_gemm(q, q_scale, weight, weight_scale, bias, out_dtype)

    def int8_linear_dynamic(self, x: torch.Tensor, amax: torch.Tensor | None, weight: torch.Tensor,
                            weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] <= FUSED_GEMV_MAX_ROWS and int8_gemv_fused.fusable(weight):
            # NOTE: the quantization rides in the GEMV: one launch where there were two
            return int8_gemv_fused.int8_gemv_dynamic(x, weight, weight_scale, bias, amax)
        q, scale = int8.quant_per_token(x, amax=amax)
        return self.int8_linear(q, scale, weight, weight_scale, bias, x.dtype)

    def int8_linear_silu(self, q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor,
                         weight_scale: torch.Tensor, out_dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
        rows = q.shape[0]
        if weight.shape[0] % 2 or weight.dim() != 2:
            return None
        if rows >= SILU_GEMM_MIN_ROWS:
            return int8.int8_gemm_silu(q, q_scale, weight, weight_scale, out_dtype)
        if rows > FUSED_GEMV_MAX_ROWS or not int8_gemv_fused.fusable(weight):
            return None
        return int8_gemv_fused.int8_gemv_silu(q, q_scale, weight, weight_scale, out_dtype)

    def rms_norm_quant(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # NOTE: in place, as rms_norm: x + residual is written into the residual it was given
        # (the returned new residual is that tensor). x is 2-D here.
        return int8.rms_norm_quant(x, weight, eps, residual, residual_out=residual)

    def silu_and_mul_quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return int8.silu_and_mul_quant(x)

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        kv_store.store_kv(k, v, kv_layer, meta.slot_mapping)

    def rotary_store_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                        norms: HeadNorms | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        fusable_norms = norms is None or rotary.takes_head_norms(q, norms.q_weight, norms.k_weight)
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or not fusable_norms:
            return rotary_then_store(self, q, k, v, positions, cos_sin, kv_layer, meta, norms)
        # NOTE: with head norms (Qwen3) the norms run in the same launch: two kernels less per layer
        head_norms = None if norms is None else (norms.q_weight, norms.k_weight, norms.eps)
        return rotary.rotary_store_kv(q, k, v, positions, cos_sin, kv_layer, meta.slot_mapping, head_norms)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
        # NOTE: one-tile decode splits: in a captured decode step max_seq_len is the model's
        # length, not the batch's, and longer splits would leave most of the card idle at
        # small batches (splits past a sequence's end exit at once).
        return attention.paged_attention(q, kv_layer, meta.query_start_loc, meta.seq_lens,
                                         meta.block_tables, scale, meta.max_query_len, meta.max_seq_len,
                                         min_split_tiles=1)
