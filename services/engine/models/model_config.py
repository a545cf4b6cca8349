"""Architecture description of a decoder model, independent of where weights come from.

Owns: ``ModelConfig`` (frozen), its JSON form, and the parsers that build it from
a Hugging Face ``config.json`` dict, from GGUF metadata, or from a named dummy
preset; the way back to a ``config.json`` dict for dense models (``to_hf_config``).
The differences between Llama-family decoders (qkv bias, q/k norm, rope
scaling, tied embeddings, sliding window) are flags here; so are the fields of
mixture-of-experts models (expert counts, top-k, sparse layers) and the
checkpoint's ``quantization_config``. Which architectures and quantizations can
be served is the model registry's answer (``registry``), not this module's.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

from pdserve.engine.models.registry import UnsupportedModelError, check_architecture
from pdserve.engine.quant.scheme import W8A8Scheme


@dataclass(frozen=True)
class QuantizationConfig:
    """A checkpoint's ``quantization_config``: its method and the rest as canonical JSON."""
    method: str
    raw_json: str = "{}"

    @property
    def raw(self) -> dict[str, Any]:
        return json.loads(self.raw_json)

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> "QuantizationConfig":
        method = str(raw.get("quant_method") or raw.get("quantization_method") or raw.get("format") or "unknown")
        return cls(method, json.dumps(raw, sort_keys=True, default=str))


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen dict items
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # mixture of experts (0 experts: a dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    quantization: QuantizationConfig | None = None

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json_dict(cls, raw: Mapping[str, Any]) -> "ModelConfig":
        """The inverse of ``to_json_dict`` (lists back to tuples)."""
        values = dict(raw)
        if values.get("rope_scaling"):
            values["rope_scaling"] = tuple(tuple(kv) for kv in values["rope_scaling"])
        for name in ("eos_token_ids", "mlp_only_layers"):
            values[name] = tuple(values.get(name) or ())
        if values.get("quantization"):
            values["quantization"] = QuantizationConfig(**values["quantization"])
        return cls(**values)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def max_model_len(self) -> int:
        """Longest context served; a sliding window caps it (no windowed attention yet)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def num_params(self) -> int:
        """Every weight (all experts of a mixture-of-experts model, not only the active ones)."""
        h, v = self.hidden_size, self.vocab_size
        attn = h * self.head_dim * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlps = sum(self._mlp_params(i) for i in range(self.num_layers))
        return self.num_layers * (attn + 2 * h) + mlps + v * h * (1 if self.tie_word_embeddings else 2) + h

    def is_sparse_layer(self, index: int) -> bool:
        """Whether decoder layer ``index`` has experts (Qwen2-MoE's rule; every layer of Mixtral)."""
        return (self.num_experts > 0 and index not in self.mlp_only_layers
                and (index + 1) % self.decoder_sparse_step == 0)

    def _mlp_params(self, index: int) -> int:
        h = self.hidden_size
        if not self.is_sparse_layer(index):
            return 3 * h * self.intermediate_size
        shared = 3 * h * self.shared_expert_intermediate_size + h if self.shared_expert_intermediate_size else 0
        return self.num_experts * (3 * h * self.moe_intermediate_size + h) + shared


def _rope_scaling(cfg: Mapping[str, Any]) -> tuple[tuple[str, Any], ...] | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (supported: default, llama3)")
    return tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict))))


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", 10000.0))


def from_hf_config(cfg: Mapping[str, Any]) -> ModelConfig:
    """Parse a Hugging Face config.json dict."""
    archs = cfg.get("architectures") or [cfg.get("model_type", "<missing>")]
    arch = archs[0]
    check_architecture(arch)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    eos = cfg.get("eos_token_id")
    is_qwen2 = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
    window = cfg.get("sliding_window") if (arch == "MistralForCausalLM" or cfg.get("use_sliding_window")) else None
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=is_qwen2 or bool(cfg.get("attention_bias", False)),
        o_bias=(not is_qwen2) and bool(cfg.get("attention_bias", False)),
        qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        rope_scaling=_rope_scaling(cfg),
        sliding_window=int(window) if window else None,
        eos_token_ids=tuple(eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else [])),
        **_moe_fields(cfg, arch),
        quantization=QuantizationConfig.from_hf(cfg["quantization_config"]) if cfg.get("quantization_config") else None,
    )


_HF_MODEL_TYPE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                  "Qwen3ForCausalLM": "qwen3"}


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face config.json dict of a dense float model (what a GGUF file describes), so
    that transformers builds the network pdserve runs; ``from_hf_config`` parses it back to
    ``cfg``. ValueError for what it cannot express (experts, quantization, other families)."""
    if cfg.architecture not in _HF_MODEL_TYPE or cfg.num_experts or cfg.quantization is not None:
        raise ValueError(f"no Hugging Face config for {cfg.architecture} (dense {', '.join(_HF_MODEL_TYPE)} only)")
    qwen2 = cfg.architecture == "Qwen2ForCausalLM"  # q, k, v biased, o not; the others: attention_bias, all four
    biases_ok = (cfg.qkv_bias, cfg.o_bias) == (True, False) if qwen2 else cfg.qkv_bias == cfg.o_bias
    if not biases_ok or cfg.qk_norm != (cfg.architecture == "Qwen3ForCausalLM"):
        raise ValueError(f"{cfg.architecture} has no config for these biases / norms")
    out: dict[str, Any] = dict(
        architectures=[cfg.architecture], model_type=_HF_MODEL_TYPE[cfg.architecture], vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        hidden_act="silu", rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings)
    if not qwen2:
        out["attention_bias"] = cfg.qkv_bias
    if cfg.rope_scaling:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.sliding_window:
        out.update(sliding_window=cfg.sliding_window, use_sliding_window=True)
    if cfg.eos_token_ids:
        out["eos_token_id"] = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids)
    return out


def _moe_fields(cfg: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """Expert counts and routing of Mixtral / Qwen2-MoE / Qwen3-MoE configs (empty for dense ones).
    Mixtral always renormalises its top-k weights (its config has no flag for it)."""
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    if not experts:
        return {}
    return dict(num_experts=experts, num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
                moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0),
                shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
                norm_topk_prob=arch == "MixtralForCausalLM" or bool(cfg.get("norm_topk_prob", False)),
                decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
                mlp_only_layers=tuple(int(x) for x in cfg.get("mlp_only_layers") or ()))


_GGUF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def from_gguf_metadata(meta: Mapping[str, Any], has_output_weight: bool) -> ModelConfig:
    """Parse GGUF key/values (``general.architecture`` prefixed keys)."""
    arch_key = meta.get("general.architecture", "<missing>")
    if arch_key not in _GGUF_ARCH:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch_key!r}; supported: {', '.join(_GGUF_ARCH)}")
    p = arch_key + "."
    heads = int(meta[p + "attention.head_count"])
    hidden = int(meta[p + "embedding_length"])
    head_dim = int(meta.get(p + "attention.key_length") or meta.get(p + "rope.dimension_count") or hidden // heads)
    vocab = meta.get(p + "vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=_GGUF_ARCH[arch_key],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta[p + "feed_forward_length"]),
        num_layers=int(meta[p + "block_count"]),
        num_heads=heads,
        num_kv_heads=int(meta.get(p + "attention.head_count_kv") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(meta[p + "attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta.get(p + "context_length", 4096)),
        tie_word_embeddings=not has_output_weight,
        qkv_bias=arch_key == "qwen2",
        qk_norm=arch_key == "qwen3",
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=8192, eos_token_id=128001),
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                         max_position_embeddings=131072, eos_token_id=128001,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=32768, eos_token_id=151645),
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True, eos_token_id=2),
    # mixture of experts (shapes of the published configs)
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1000000.0,
                         max_position_embeddings=32768, num_local_experts=8, num_experts_per_tok=2,
                         eos_token_id=2),
    "qwen1.5-moe-a2.7b": dict(architectures=["Qwen2MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
                              intermediate_size=5632, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                              num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
                              decoder_sparse_step=1, rms_norm_eps=1e-6, rope_theta=1000000.0,
                              max_position_embeddings=8192, eos_token_id=151643),
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, rms_norm_eps=1e-6,
                          rope_theta=1000000.0, max_position_embeddings=40960, eos_token_id=151645),
}


W8A8_SUFFIX = "-w8a8"  # a dense preset with random int8 weights (SmoothQuant W8A8 shapes)


def from_preset(name: str) -> ModelConfig:
    """A preset's config; ``<preset>-w8a8`` is the same model as a W8A8 checkpoint."""
    base = name.removesuffix(W8A8_SUFFIX)
    if base not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise UnsupportedModelError(f"unknown dummy preset {name!r}; known: {known} (each also as <preset>{W8A8_SUFFIX})")
    raw = dict(PRESETS[base])
    if name != base:
        raw["quantization_config"] = W8A8Scheme().quantization_config()
    return from_hf_config(raw)
