"""The backend interface and the per-step attention metadata it consumes.

Owns: ``AttentionMetadata`` (built once per step by the model runner, passed down
explicitly through every layer; never stored globally), ``LoRAMapping`` (each token's
adapter slot, views of buffers owned by the rank's ``lora.rows.StepRows``), the ``Backend``
protocol, ``HeadNorms`` (the per-head q/k norms ``rotary_store_kv`` may apply first), and
``rotary_then_store`` / ``norm_heads`` (the unfused path of ``rotary_store_kv``). A
backend is stateless apart from what it caches for one step.

KV layout per layer: ``kv_layer[num_blocks, 2, block_size, num_kv_heads, head_dim]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of this step sits in the paged KV cache.

    Sequence b owns query rows ``query_start_loc[b]:query_start_loc[b+1]``, the last
    query tokens of its ``seq_lens[b]``-token context (a decode step is one row).
    """
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


@dataclass(frozen=True)
class HeadNorms:
    """RMSNorm of each q and k head before the rotary (Qwen3's q_norm / k_norm): weights [D]."""
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float


@dataclass(frozen=True)
class LoRAMapping:
    """Which LoRA adapter slot each of a step's T tokens uses, and the tokens grouped by slot
    (``kernels/reference.py``: ``group_by_slot``): slot s's tokens are
    ``sorted_tokens[slot_start[s]:slot_start[s] + slot_count[s]]``. All int32 on the device.

    NOTE: views of device buffers that outlive the step, so a captured graph replays with
    whatever slots the next step writes into them.
    """
    token_slots: torch.Tensor  # [T]: the token's slot, -1 = the base model (no adapter)
    sorted_tokens: torch.Tensor  # [T]: token indices, slot 0's first, base tokens last
    slot_start: torch.Tensor  # [S]
    slot_count: torch.Tensor  # [S]
    # [S]: the rank of each slot's adapter (A's rows / B's columns past it are zero padding);
    # None: every slot may use the stacks' whole rank
    slot_rank: torch.Tensor | None = None


class Backend(Protocol):
    name: str

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed(x + residual), x + residual)."""

    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor: ...

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                 meta: AttentionMetadata) -> None: ...

    def prepare_linear_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The form of a float weight [N, K] this backend's ``linear`` reads fastest (e.g. packed
        for the CPU's vector dot products); called once per layer after loading. ``linear``
        takes the result in place of the weight."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T (+ bias)`` for an nn.Linear weight [N, K], or what ``prepare_linear_weight``
        made of one."""

    def lora_delta(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   lora: LoRAMapping, part_ends: tuple[int, ...]) -> None:
        """In place, for one layer (all its parts at once): ``y[t, part p] += (x[t] @ a[s, rows
        of p].T) @ b[s, part p].T`` for every token t whose slot s = ``lora.token_slots[t]`` is
        >= 0; rows of slot -1 are untouched.

        Args:
            y: [T, N] the layer's output, its parts side by side.
            x: [T, K] the layer's input.
            a: [S, P * R, K] the parts' stacked A (part p in rows [p R, (p + 1) R));
                b: [S, N, R] their stacked, scaled B (rows in y's column order).
            part_ends: the column where each part ends in y (the last is N).
        """

    def prepare_expert_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """The form of a sparse MLP's stacked expert weights [E, N, K] this backend's ``fused_moe``
        reads fastest; called once per layer and stack after loading."""

    def route(self, logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A sparse MLP's routing: (weights float32 [T, K], expert ids int64 [T, K]) of the router's
        logits [T, E], as ``reference.moe_route_ref``."""

    def fused_moe(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
        """The experts of a sparse MLP: ``sum_k w[t, k] * down_e(silu(gate_e(x)) * up_e(x))``,
        ``e = topk_ids[t, k]``; w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], or what
        ``prepare_expert_weights`` made of them."""

    # ---- W8A8: int8 weights (per output channel) x int8 activations (per token) -------
    def prepare_int8_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The form of an int8 weight [N, K] this backend's ``int8_linear`` reads fastest
        (e.g. packed for the CPU's int8 dot products); called once per layer after loading."""

    def quant_per_token(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, K] -> (q int8 [T, K], scale float32 [T, 1]), symmetric, dynamic (``quant_per_token_ref``)."""

    def int8_linear(self, q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """``(q @ weight.T) * q_scale * weight_scale.T (+ bias)`` from int32 sums; weight int8
        [N, K], weight_scale float32 [N, 1]; out_dtype [T, N]."""

    def int8_linear_dynamic(self, x: torch.Tensor, amax: torch.Tensor | None, weight: torch.Tensor,
                            weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``quant_per_token(x)`` then ``int8_linear`` in x's dtype (x [T, K] float; ``amax``
        [T] float32, each row's max |x|, where the producer recorded it)."""

    def int8_linear_silu(self, q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor,
                         weight_scale: torch.Tensor, out_dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A gate_up matmul with SiLU-and-mul fused in: (h = silu(gate) * up [T, I] out_dtype,
        amax [T] float32 = max |h| per row), where ``weight`` is [2I, K] (gate rows, then up
        rows); None where this backend has no fused form for these operands."""

    def rms_norm_quant(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``rms_norm`` with its output quantized per token: (q, scale, x + residual)."""

    def silu_and_mul_quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``silu_and_mul`` with its output quantized per token: (q, scale)."""

    def rotary_store_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                        norms: HeadNorms | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(``rms_norm`` of each q and k head with ``norms``,) ``rotary``, then ``store_kv`` of the
        rotated k and v; returns the rotated (q, k)."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Causal attention of q [T, Hq, D] over the cache (k, v of this step already stored).

        k and v [T, Hkv, D] are this step's fresh keys/values, which a backend may
        use directly for sequences with no cached prefix.
        """

    # ---- a whole decoder stack in few calls (where a backend has it) -------------------
    def fuse_decoder_layers(self, layers: list[DecoderLayerWeights]) -> object | None:
        """Once, after ``prepare_linear_weight``: this backend's fused form of a stack of plain
        decoder layers, or None where it has none (the model then runs op by op)."""

    def run_fused_decoder(self, fused: object, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                          kv_cache: torch.Tensor, meta: AttentionMetadata,
                          on_layer_done: Callable[[int], None] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer of ``fused`` over the embeddings x [T, hidden] (which it may overwrite):
        (the last layer's output, the residual stream), as the op-by-op forward computes them."""


@dataclass(frozen=True)
class LinearLoRA:
    """A projection's LoRA adapters as a fused layer reads them: the stacks ``lora_delta`` takes
    (a [S, P * R, K], b [S, N, R]), the column where each of its P parts ends, and ``mapping``,
    the step's token slots for T rows (None when no token has an adapter)."""
    a: torch.Tensor
    b: torch.Tensor
    part_ends: tuple[int, ...]
    mapping: Callable[[int], LoRAMapping | None]


@dataclass(frozen=True)
class DecoderLayerWeights:
    """A plain Llama-family decoder layer's tensors, as prepared for the backend: RMSNorm ->
    qkv (one merged weight) -> rotary, KV store, attention -> o -> RMSNorm -> gate_up (merged)
    -> SiLU-and-mul -> down, with no q/k norms or collectives. Either every projection is
    unquantized (the ``*_scale`` fields None), each with or without LoRA adapters (its delta
    added to its output, as ``lora_delta``), or every one is W8A8 without adapters: int8
    weights with their per-output-column scales, each input quantized per token."""
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    down: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    qkv_scale: torch.Tensor | None = None
    o_scale: torch.Tensor | None = None
    gate_up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None
    # the adapters of each unquantized projection (None: it has none)
    qkv_lora: LinearLoRA | None = None
    o_lora: LinearLoRA | None = None
    gate_up_lora: LinearLoRA | None = None
    down_lora: LinearLoRA | None = None

    @property
    def w8a8(self) -> bool:
        return self.qkv_scale is not None


def norm_heads(be: Backend, q: torch.Tensor, k: torch.Tensor,
               norms: HeadNorms | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The head norms of ``rotary_store_kv`` as two ``rms_norm`` ops (q and k unchanged without)."""
    if norms is None:
        return q, k
    return be.rms_norm(q, norms.q_weight, norms.eps)[0], be.rms_norm(k, norms.k_weight, norms.eps)[0]


def rotary_then_store(be: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos_sin: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                      norms: HeadNorms | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_store_kv`` as separate ops: the path of backends without a fused one."""
    q, k = norm_heads(be, q, k, norms)
    q, k = be.rotary(q, k, positions, cos_sin)
    be.store_kv(k, v, kv_layer, meta)
    return q, k

