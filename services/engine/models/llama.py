"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2) over a paged KV cache.

Owns: the module tree, assembled from ``pdserve.engine.layers`` (so each layer
holds its rank's slice and does its own collectives), and the map from Hugging
Face checkpoint names to those layers (q/k/v load into the parts of
``qkv_proj``, gate/up into the parts of ``gate_up_proj``). The forward takes flat
token rows of a mixed batch plus ``AttentionMetadata``; it holds no per-request
state: the KV cache shard is passed in by the runner.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from pdserve.engine.backends.base import AttentionMetadata, Backend, DecoderLayerWeights, HeadNorms
from pdserve.engine.layers import (LayerContext, MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                                   RMSNorm, RotaryEmbedding, RowParallelLinear, VocabParallelEmbedding, load_into)
from pdserve.engine.layers.loading import CheckpointTensor
from pdserve.engine.models.interface import LayerHook
from pdserve.engine.models.model_config import ModelConfig

FusedWeight = tuple[torch.Tensor, torch.Tensor | None]  # LinearBase.fused_weight: (weight, W8A8 scales or None)

# checkpoint projection -> (our merged layer, its part)
_MERGED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def _names(prefix: str, *modules: str) -> tuple[str, ...]:
    """The checkpoint module names a layer holds (a quantized checkpoint says per name)."""
    return tuple(f"{prefix}.{m}" for m in modules)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: LayerContext, prefix: str):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          cfg.qkv_bias, ctx, names=_names(prefix, "q_proj", "k_proj", "v_proj"))
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.o_bias, ctx,
                                        names=_names(prefix, "o_proj"))
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ctx) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ctx) if cfg.qk_norm else None
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x, positions, cos_sin, kv_layer, meta: AttentionMetadata, be: Backend):
        q, k, v = self.qkv_proj(x, be).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        norms = None if self.q_norm is None else HeadNorms(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        q, k = be.rotary_store_kv(q, k, v, positions, cos_sin, kv_layer, meta, norms)
        o = be.attention(q, k, v, kv_layer, meta, self.scale)
        return self.o_proj(o.reshape(-1, self.q_size), be)

    def plain_weights(self) -> tuple[FusedWeight, FusedWeight] | None:
        """(qkv, o) as ``LinearBase.fused_weight`` gives them where both are plain and there are
        no q/k norms; else None."""
        qkv, o = self.qkv_proj.fused_weight(), self.o_proj.fused_weight()
        return None if qkv is None or o is None or self.q_norm is not None else (qkv, o)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: LayerContext, prefix: str, size: int | None = None):
        super().__init__()
        size = size or cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [size, size], False, ctx,
                                                       names=_names(prefix, "gate_proj", "up_proj"))
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, False, ctx, names=_names(prefix, "down_proj"))

    @property
    def takes_int8_input(self) -> bool:
        return self.gate_up_proj.takes_int8_input

    def forward(self, x, be: Backend):
        if self.down_proj.takes_int8_input:
            return self.down_proj(self.gate_up_proj.silu_and_mul_for_int8(x, be), be)
        return self.down_proj(be.silu_and_mul(self.gate_up_proj(x, be)), be)

    def plain_weights(self) -> tuple[FusedWeight, FusedWeight] | None:
        """(gate_up, down) as ``LinearBase.fused_weight`` gives them where both are plain; else None."""
        gate_up, down = self.gate_up_proj.fused_weight(), self.down_proj.fused_weight()
        return None if gate_up is None or down is None else (gate_up, down)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: LayerContext, mlp: nn.Module, prefix: str):
        super().__init__()
        self.self_attn = Attention(cfg, ctx, f"{prefix}.self_attn")
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)

    def forward(self, x, residual, positions, cos_sin, kv_layer, meta, be: Backend):
        h, residual = self.input_layernorm(x, be, residual, self.self_attn.qkv_proj.takes_int8_input)
        h = self.self_attn(h, positions, cos_sin, kv_layer, meta, be)
        h, residual = self.post_attention_layernorm(h, be, residual, self.mlp.takes_int8_input)
        return self.mlp(h, be), residual

    def plain_weights(self) -> DecoderLayerWeights | None:
        """This layer's tensors for a backend's fused layer, where it is a plain dense layer."""
        attn = self.self_attn.plain_weights()
        mlp = self.mlp.plain_weights() if isinstance(self.mlp, MLP) else None
        if attn is None or mlp is None:
            return None
        (qkv, qkv_scale), (o, o_scale), (gate_up, gate_up_scale), (down, down_scale) = *attn, *mlp
        scales = (qkv_scale, o_scale, gate_up_scale, down_scale)
        if any(s is None for s in scales) and any(s is not None for s in scales):
            return None  # NOTE: part quantized (a checkpoint's ignore list): op by op
        a, m = self.self_attn, self.mlp
        return DecoderLayerWeights(
            input_norm=self.input_layernorm.weight, post_norm=self.post_attention_layernorm.weight,
            eps=self.input_layernorm.eps, qkv=qkv, qkv_bias=a.qkv_proj.bias, o=o, o_bias=a.o_proj.bias,
            gate_up=gate_up, down=down, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
            scale=a.scale, qkv_scale=qkv_scale, o_scale=o_scale, gate_up_scale=gate_up_scale, down_scale=down_scale,
            qkv_lora=a.qkv_proj.fused_lora(), o_lora=a.o_proj.fused_lora(), gate_up_lora=m.gate_up_proj.fused_lora(),
            down_lora=m.down_proj.fused_lora())


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: LayerContext, mlp: Callable[[int], nn.Module]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx,
                                                   serves_logits=cfg.tie_word_embeddings)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ctx, mlp(i), f"model.layers.{i}") for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: LayerContext):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, ctx, lambda index: self.build_mlp(cfg, ctx, index))
        self.lm_head = None if cfg.tie_word_embeddings else ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ctx)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_model_len, cfg.rope_theta, cfg.rope_scaling_dict)
        self.fused: object | None = None  # the backend's fused decoder stack (``fuse_layers``)

    def build_mlp(self, cfg: ModelConfig, ctx: LayerContext, index: int) -> nn.Module:
        """The MLP of decoder layer ``index`` (mixture-of-experts models override it)."""
        return MLP(cfg, ctx, f"model.layers.{index}.mlp")

    def kv_heads_per_rank(self) -> int:
        return self.model.layers[0].self_attn.num_kv_heads if self.model.layers else 0

    def prepare(self, device: torch.device) -> None:
        self.rotary.prepare(device)

    def fuse_layers(self, be: Backend) -> bool:
        """Once, after the weights are prepared: run the decoder stack as ``be``'s fused layers
        where every layer is plain and ``be`` has them (then ``forward`` must get ``be``)."""
        layers = [layer.plain_weights() for layer in self.model.layers]
        self.fused = None if None in layers else be.fuse_decoder_layers(layers)
        return self.fused is not None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, be: Backend, on_layer_done: LayerHook | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm. kv_cache is [L, N, 2, bs, Hkv, D]."""
        x = self.model.embed_tokens(input_ids)
        residual, cos_sin = None, self.rotary.cos_sin
        if self.fused is not None:
            x, residual = be.run_fused_decoder(self.fused, x, positions, cos_sin, kv_cache, meta, on_layer_done)
            return self.model.norm(x, be, residual)[0]
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, positions, cos_sin, kv_cache[i], meta, be)
            if on_layer_done is not None:
                on_layer_done(i)
        return self.model.norm(x, be, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, be: Backend) -> torch.Tensor:
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return head.logits(hidden, be)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (checkpoint name, whole tensor) pairs; an error names any misfit or gap."""
        load_into(self, self._route(weights), self.config.architecture)

    def _route(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[CheckpointTensor]:
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue  # NOTE: tied: the embedding is the head
            yield self.route_tensor(name, tensor)

    def route_tensor(self, name: str, tensor: torch.Tensor) -> CheckpointTensor:
        """Where one checkpoint tensor goes (mixture-of-experts models add the experts' names)."""
        module, _, param = name.rpartition(".")
        owner, _, proj = module.rpartition(".")
        shard = None
        if proj in _MERGED:
            merged, shard = _MERGED[proj]
            module = f"{owner}.{merged}"
        return CheckpointTensor(name, module, param, shard, tensor)


__all__ = ["LlamaForCausalLM"]
