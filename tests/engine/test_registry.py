"""The model registry and the config fields later model kinds need: MoE counts parse, quantized
and unknown checkpoints are refused with the method / architecture named, the JSON form round-trips."""
from __future__ import annotations

import json

import pytest

from pdserve.common.model_source import resolve_model
from pdserve.engine.models import model_config as mc
from pdserve.engine.models.llama import LlamaForCausalLM
from pdserve.engine.models.loader import load_config
from pdserve.engine.models.registry import UnsupportedModelError, model_class, supported_architectures

QWEN3_MOE = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
                 moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=[0], num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)


def test_every_registered_architecture_builds_a_model_class():
    from pdserve.engine.models.moe import MoeForCausalLM

    for arch in supported_architectures():
        assert model_class(arch) is (MoeForCausalLM if "Mixtral" in arch or "Moe" in arch else LlamaForCausalLM)
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'GPT2LMHeadModel'"):
        model_class("GPT2LMHeadModel")


def test_moe_fields_parse():
    cfg = mc.from_hf_config(QWEN3_MOE)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 32)
    assert cfg.norm_topk_prob and cfg.mlp_only_layers == (0,) and cfg.qk_norm
    assert [cfg.is_sparse_layer(i) for i in range(2)] == [False, True]
    assert mc.ModelConfig.from_json_dict(json.loads(json.dumps(cfg.to_json_dict()))) == cfg
    mixtral = mc.from_preset("mixtral-8x7b")
    assert mixtral.norm_topk_prob and all(mixtral.is_sparse_layer(i) for i in range(mixtral.num_layers))
    assert round(mixtral.num_params() / 1e9, 1) == 46.7  # every expert counted


def test_a_quantized_checkpoint_is_refused_naming_its_method(tiny_models, tmp_path):
    src = tiny_models["llama"]
    with open(f"{src}/config.json") as fh:
        raw = json.load(fh)
    raw["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match="quantized with 'awq'"):
        load_config(resolve_model(str(tmp_path)))
    cfg = mc.from_hf_config(raw)
    assert cfg.quantization.method == "awq" and cfg.quantization.raw["bits"] == 4
    assert mc.ModelConfig.from_json_dict(json.loads(json.dumps(cfg.to_json_dict()))) == cfg


@pytest.mark.parametrize("raw", [
    dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=5e5,
         max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=2),
    dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
         num_hidden_layers=2, num_attention_heads=4, attention_bias=True, eos_token_id=[2, 3],
         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=256)),
    dict(architectures=["Qwen2ForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    dict(architectures=["Qwen3ForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    dict(architectures=["MistralForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=64),
], ids=["llama-tied", "llama-bias-llama3-rope", "qwen2", "qwen3", "mistral-window"])
def test_a_dense_config_goes_back_to_hugging_face_unchanged(raw):
    """``to_hf_config`` (how the quantizer hands a GGUF model to transformers): parsed back, the
    same ``ModelConfig``; transformers builds the same shapes from it."""
    from transformers import AutoConfig

    cfg = mc.from_hf_config(raw)
    hf = mc.to_hf_config(cfg)
    assert mc.from_hf_config(hf) == cfg
    built = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"})
    assert (built.num_key_value_heads, built.head_dim, built.tie_word_embeddings) == (
        cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings)


def test_models_without_a_dense_hugging_face_config_are_refused():
    with pytest.raises(ValueError, match="dense"):
        mc.to_hf_config(mc.from_hf_config(QWEN3_MOE))
    with pytest.raises(ValueError, match="dense"):
        mc.to_hf_config(mc.from_preset("llama-3-8b-w8a8"))
