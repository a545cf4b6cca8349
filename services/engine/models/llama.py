"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2) over a paged KV cache.

Owns: the module tree and its weights. Parameter names follow Hugging Face's
checkpoints except for two fusions made at load time (``qkv_proj`` = q;k;v and
``gate_up_proj`` = gate;up), which ``load_weights`` maps. The forward takes flat
token rows of a mixed batch plus ``AttentionMetadata``; it holds no per-request
state: the KV cache is passed in by the runner.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from pdserve.kernels.reference import build_cos_sin_cache
from pdserve.engine.backends.base import AttentionMetadata, Backend
from pdserve.engine.models.model_config import ModelConfig

LayerHook = Callable[[int], None]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x, positions, cos_sin, kv_layer, meta: AttentionMetadata, be: Backend):
        qkv = be.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = be.rms_norm(q, self.q_norm.weight, self.q_norm.eps)[0]
            k = be.rms_norm(k, self.k_norm.weight, self.k_norm.eps)[0]
        q, k = be.rotary_store_kv(q, k, v, positions, cos_sin, kv_layer, meta)
        o = be.attention(q, k, v, kv_layer, meta, self.scale)
        return be.linear(o.reshape(-1, self.q_size), self.o_proj.weight, self.o_proj.bias)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, be: Backend):
        return be.linear(be.silu_and_mul(be.linear(x, self.gate_up_proj.weight)), self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, cos_sin, kv_layer, meta, be: Backend):
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        h, residual = be.rms_norm(x, ln1.weight, ln1.eps, residual)
        h = self.self_attn(h, positions, cos_sin, kv_layer, meta, be)
        h, residual = be.rms_norm(h, ln2.weight, ln2.eps, residual)
        return self.mlp(h, be), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def init_rope(self, max_pos: int, device: torch.device) -> None:
        cfg = self.config
        self.cos_sin = build_cos_sin_cache(cfg.head_dim, max_pos, cfg.rope_theta, cfg.rope_scaling_dict).to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, be: Backend, on_layer_done: LayerHook | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm. kv_cache is [L, N, 2, bs, Hkv, D]."""
        x = self.model.embed_tokens(input_ids)
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, positions, self.cos_sin, kv_cache[i], meta, be)
            if on_layer_done is not None:
                on_layer_done(i)
        norm = self.model.norm
        return be.rms_norm(x, norm.weight, norm.eps, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, be: Backend) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return be.linear(hidden, weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (hf_name, tensor) pairs in, fusing q/k/v and gate/up; error on any gap."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target, rows = self._map_name(name)
            if target is None:
                continue
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
            param = params[target]
            dst = param.data if rows is None else param.data[rows]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(name)
        self._check_complete(loaded)

    def _map_name(self, name: str) -> tuple[str | None, slice | None]:
        if "rotary_emb" in name:
            return None, None
        if name == "lm_head.weight" and self.lm_head is None:
            return None, None  # tied: the embedding is the head
        a = self.model.layers[0].self_attn if self.model.layers else None
        fused = {
            "self_attn.q_proj": ("self_attn.qkv_proj", 0, a.q_size if a else 0),
            "self_attn.k_proj": ("self_attn.qkv_proj", a.q_size if a else 0, a.kv_size if a else 0),
            "self_attn.v_proj": ("self_attn.qkv_proj", (a.q_size + a.kv_size) if a else 0, a.kv_size if a else 0),
            "mlp.gate_proj": ("mlp.gate_up_proj", 0, self.config.intermediate_size),
            "mlp.up_proj": ("mlp.gate_up_proj", self.config.intermediate_size, self.config.intermediate_size),
        }
        for part, (fused_name, start, size) in fused.items():
            if f".{part}." in name:
                return name.replace(part, fused_name), slice(start, start + size)
        return name, None

    def _check_complete(self, loaded: set[str]) -> None:
        expected = set()
        for name, _ in self.named_parameters():
            if ".qkv_proj." in name:
                expected |= {name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")}
            elif ".gate_up_proj." in name:
                expected |= {name.replace("gate_up_proj", p) for p in ("gate_proj", "up_proj")}
            else:
                expected.add(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
