"""Every bad input to the engine raises a ValueError (or subclass) with a clear message."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.config import ConfigError, EngineConfig


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["qwen2"], num_blocks=64, max_model_len=128)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(max_tokens="5"), "max_tokens"),
    (dict(logprobs=50), "logprobs"),
    (dict(stop=[""]), "stop"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], SamplingParams())
    assert llm.kv_stats()["used"] == 0


def test_prompt_longer_than_context(llm):
    with pytest.raises(ValueError, match="context is 128"):
        llm.generate([[5] * 200], SamplingParams())
    assert llm.kv_stats()["used"] == 0


def test_bad_token_id(llm):
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[5, 10**9]], SamplingParams())


def test_failed_batch_frees_blocks(llm):
    with pytest.raises(ValueError):
        llm.generate([[5, 6], [7] * 500], SamplingParams(max_tokens=3))
    assert llm.kv_stats()["used"] == 0 and not llm.engine.has_unfinished()


def test_generation_stops_at_context(llm):
    out = llm.generate([[5] * 120], SamplingParams(max_tokens=50, ignore_eos=True, temperature=0))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8


def test_unknown_model_path():
    with pytest.raises(ValueError, match="not found"):
        LLM("/nonexistent/model/dir")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_bad_engine_config():
    with pytest.raises(ConfigError, match="role"):
        EngineConfig(role="prefil")
    with pytest.raises(ConfigError, match="block_size"):
        EngineConfig(block_size=12)
    with pytest.raises(ConfigError, match="tp"):
        EngineConfig(tp=0)
    with pytest.raises(ConfigError, match="unknown engine config keys"):
        EngineConfig.from_mapping({"modle": "x"})
    with pytest.raises(ConfigError, match="lora_target_modules=\\('qkv_proj',\\) is invalid: expected names among"):
        EngineConfig(lora_target_modules=("qkv_proj",))
    with pytest.raises(ConfigError, match="'all' stands alone"):
        EngineConfig.from_mapping({"lora_target_modules": ["all", "q_proj"]})
    assert EngineConfig.from_mapping({"lora_target_modules": ["q_proj", "v_proj"]}).lora_target_modules == (
        "q_proj", "v_proj")


def test_unsupported_gguf_quant_type(tmp_path):
    gguf = pytest.importorskip("gguf")

    path = str(tmp_path / "bad.gguf")
    w = gguf.GGUFWriter(path, "llama")
    for key, value in {"block_count": 1, "context_length": 64, "embedding_length": 32, "feed_forward_length": 64,
                       "attention.head_count": 2, "attention.head_count_kv": 2, "vocab_size": 32}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    # Q8_1: 32 values per 40-byte block; the gguf package cannot dequantize it
    w.add_tensor("token_embd.weight", np.zeros((32, 40), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="Q8_1"):
        LLM(path)
