"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE over a paged KV cache.

Owns: the sparse MLP block (router, experts, and Qwen2-MoE's shared expert with its
sigmoid gate) and the map from the checkpoints' expert names to ``FusedMoE``'s parts. Attention,
norms, embeddings and dense MLPs are the Llama family's (``llama``); the differences
between the three (qkv bias, q/k norm, renormalised top-k, a shared expert) are
flags of ``ModelConfig`` (``is_sparse_layer`` says which layers have experts).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from pdserve.engine.backends.base import Backend
from pdserve.engine.layers import LayerContext, ReplicatedLinear
from pdserve.engine.layers.loading import CheckpointTensor
from pdserve.engine.layers.moe import FusedMoE
from pdserve.engine.models.llama import MLP, LlamaForCausalLM
from pdserve.engine.models.model_config import ModelConfig

# experts.<e>.<projection> in Mixtral (w1 gate, w3 up, w2 down) and Qwen (gate/up/down_proj) checkpoints
_EXPERT = re.compile(r"^(?P<owner>.*)\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)$")
_PARTS = {"w1": ("w13", 0), "gate_proj": ("w13", 0), "w3": ("w13", 1), "up_proj": ("w13", 1),
          "w2": ("w2", None), "down_proj": ("w2", None)}


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: LayerContext, prefix: str):
        super().__init__()
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts, False, ctx, names=(f"{prefix}.gate",))
        self.experts = FusedMoE(cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size,
                                cfg.moe_intermediate_size, cfg.norm_topk_prob, ctx)
        shared = cfg.shared_expert_intermediate_size
        self.shared_expert = MLP(cfg, ctx, f"{prefix}.shared_expert", shared) if shared else None
        self.shared_expert_gate = (ReplicatedLinear(cfg.hidden_size, 1, False, ctx, names=(f"{prefix}.shared_expert_gate",))
                                   if shared else None)

    takes_int8_input = False  # NOTE: the router and the experts read the float rows

    def forward(self, x: torch.Tensor, be: Backend) -> torch.Tensor:
        out = self.experts(x, self.gate(x, be), be)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x, be)) * self.shared_expert(x, be)
        return out


class MoeForCausalLM(LlamaForCausalLM):
    def build_mlp(self, cfg: ModelConfig, ctx: LayerContext, index: int) -> nn.Module:
        prefix = f"model.layers.{index}.mlp"
        return SparseMoeBlock(cfg, ctx, prefix) if cfg.is_sparse_layer(index) else MLP(cfg, ctx, prefix)

    def route_tensor(self, name: str, tensor: torch.Tensor) -> CheckpointTensor:
        ours = name.replace(".block_sparse_moe.", ".mlp.")  # NOTE: Mixtral's name for the sparse block
        expert = _EXPERT.match(ours.rpartition(".")[0])
        if expert is None:
            routed = super().route_tensor(ours, tensor)
            return CheckpointTensor(name, routed.module, routed.param, routed.shard, tensor)
        param, part = _PARTS[expert["proj"]]
        return CheckpointTensor(name, f"{expert['owner']}.experts", param, (int(expert["expert"]), part), tensor)


__all__ = ["MoeForCausalLM", "SparseMoeBlock"]
