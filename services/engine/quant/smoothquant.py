"""SmoothQuant W8A8 of a Hugging Face Llama-family model: calibrate, smooth, quantize.

Owns the algorithm, on a float32 transformers model in memory (the tool around it,
reading and writing checkpoints, is ``quantize_cli``):
1. ``calibrate``: one pass over calibration windows with forward hooks, keeping each
   decoder Linear's per-input-channel maximum of |x|.
2. ``smooth``: per decoder layer, scales ``s_j = max|X_j|^a / max|W_:,j|^(1-a)`` move
   activation outliers into the weights. The division by ``s`` is folded into what
   produces the Linear's input, so the float model computes the same function:
   input_layernorm -> q, k, v; post_attention_layernorm -> gate, up; v -> o (per
   KV head: every query head of a group reads the same v channels, so a v channel's
   scale covers all o columns that read it); up -> down (SiLU(gate) * up is linear in up).
3. ``quantize_weights``: every Linear the scheme quantizes to symmetric int8 with
   one scale per output channel (compressed-tensors' rule: scale = max|w| / 127.5,
   rounded and clamped to [-128, 127]); the state dict to write, as compressed-tensors
   names it (``<module>.weight`` int8, ``<module>.weight_scale`` float32 [out, 1]).
Activations are quantized at run time (per token), so nothing about them is stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from pdserve.engine.quant.scheme import W8A8Scheme

_MIN_SCALE = 1e-5


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength: 0 keeps activations as they are, 1 moves all to weights
    calib_samples: int = 64
    calib_len: int = 512

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.calib_samples < 1 or self.calib_len < 2:
            raise ValueError(f"need calib_samples >= 1 and calib_len >= 2, got {self.calib_samples}, {self.calib_len}")


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear of the decoder layers by its checkpoint module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name}


@torch.no_grad()
def calibrate(model: nn.Module, windows: Iterable[list[int]], progress: Callable[[], None] = lambda: None
              ) -> dict[str, torch.Tensor]:
    """Per decoder Linear, the maximum |x| of each input channel over ``windows``."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, inputs, _output):
            seen = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0).float()
            maxima[name] = seen if name not in maxima else torch.maximum(maxima[name], seen)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in decoder_linears(model).items()]
    try:
        for window in windows:
            model(torch.tensor([window]))
            progress()
    finally:
        for h in handles:
            h.remove()
    return maxima


def smoothing_scales(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per input channel: ``max|X|^a / max|W|^(1-a)`` over the Linears that share the input."""
    w_max = torch.stack([w.abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    s = x_max.clamp(min=_MIN_SCALE).pow(alpha) / w_max.clamp(min=_MIN_SCALE).pow(1 - alpha)
    return torch.where(x_max > 0, s.clamp(min=_MIN_SCALE), torch.ones_like(s))


@torch.no_grad()
def smooth(model: nn.Module, maxima: dict[str, torch.Tensor], alpha: float) -> None:
    """Apply the four smoothing pairs of every decoder layer in place (see module doc)."""
    cfg = model.config
    group = cfg.num_attention_heads // getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        _fold_into_norm(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj],
                        maxima[f"{prefix}.self_attn.q_proj"], alpha)
        _fold_into_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj],
                        maxima[f"{prefix}.mlp.gate_proj"], alpha)
        head_dim = attn.o_proj.in_features // cfg.num_attention_heads
        _fold_v_into_o(attn.v_proj, attn.o_proj, maxima[f"{prefix}.self_attn.o_proj"], alpha, group, head_dim)
        _fold_rows(mlp.up_proj, mlp.down_proj, smoothing_scales(maxima[f"{prefix}.mlp.down_proj"],
                                                                [mlp.down_proj.weight], alpha))


def _fold_into_norm(norm: nn.Module, linears: list[nn.Linear], x_max: torch.Tensor, alpha: float) -> None:
    s = smoothing_scales(x_max, [lin.weight for lin in linears], alpha)
    norm.weight.div_(s.to(norm.weight.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype))


def _fold_v_into_o(v: nn.Linear, o: nn.Linear, x_max: torch.Tensor, alpha: float, group: int, head_dim: int) -> None:
    """o's input column h*D + d reads v channel (h // group)*D + d: one scale per v channel,
    from the maxima over the o columns that read it."""
    kv_heads = v.out_features // head_dim
    per_v = lambda t: t.reshape(*t.shape[:-1], kv_heads, group, head_dim).amax(dim=-2).reshape(*t.shape[:-1], -1)  # noqa: E731
    w_max = per_v(o.weight.abs().float())
    s_v = smoothing_scales(per_v(x_max), [w_max], alpha)
    _fold_rows(v, o, s_v, expand=lambda s: s.reshape(kv_heads, 1, head_dim).expand(kv_heads, group, head_dim).reshape(-1))


def _fold_rows(producer: nn.Linear, consumer: nn.Linear, s: torch.Tensor,
               expand: Callable[[torch.Tensor], torch.Tensor] = lambda s: s) -> None:
    """producer's output channel c divided by s[c], consumer's input columns that read c times it."""
    producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
    if producer.bias is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    consumer.weight.mul_(expand(s).to(consumer.weight.dtype))


def quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (q int8 [N, K], scale float32 [N, 1]), w ~= q * scale."""
    scale = (w.abs().amax(dim=1, keepdim=True).float() / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.round(w.float() / scale).clamp(-128, 127).to(torch.int8)
    return q, scale


@torch.no_grad()
def quantize_weights(model: nn.Module, scheme: W8A8Scheme) -> dict[str, torch.Tensor]:
    """The model's state dict with every quantized Linear as int8 + per-channel scales."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # NOTE: the embedding is the head
    for name, linear in decoder_linears(model).items():
        if scheme.is_quantized(name):
            state[f"{name}.weight"], state[f"{name}.weight_scale"] = quantize_tensor(linear.weight)
    return state


__all__ = ["SmoothQuantConfig", "calibrate", "decoder_linears", "quantize_tensor", "quantize_weights", "smooth",
           "smoothing_scales"]
