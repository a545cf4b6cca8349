"""Weight formats and dtypes: sharded safetensors, dummy presets, half precision, cache sizing."""
from __future__ import annotations

import os

import pytest
import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.models.loader import load_config
from pdserve.common.model_source import resolve_model

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_sharded_checkpoint_loads_identically(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_models["qwen2"]
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    prompts = [[5, 6, 7], list(range(40, 90))]
    a = LLM(src, num_blocks=32).generate(prompts, GREEDY)
    b = LLM(str(sharded), num_blocks=32).generate(prompts, GREEDY)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_dummy_preset_runs_and_big_presets_parse():
    llm = LLM("dummy:smollm2-135m", num_blocks=16)
    out = llm.generate([[1, 2, 3]], GREEDY)[0]
    assert len(out.token_ids) == 6 and out.text == ""
    for name, layers in (("llama-3-8b", 32), ("qwen2.5-7b", 28), ("llama-3.1-8b", 32)):
        cfg = load_config(resolve_model(f"dummy:{name}"))
        assert cfg.num_layers == layers
    assert load_config(resolve_model("dummy:qwen2.5-7b")).qkv_bias
    with pytest.raises(ValueError, match="unknown dummy preset"):
        LLM("dummy:gpt-5")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_fp32(tiny_models, dtype):
    path = tiny_models["llama"]
    ref = LLM(path, num_blocks=16).generate([[5, 6, 7]], GREEDY)[0].token_ids
    llm = LLM(path, num_blocks=16, dtype=dtype)
    assert llm.engine.kv_cache.dtype == getattr(torch, dtype)
    out = llm.generate([[5, 6, 7]], GREEDY)[0].token_ids
    assert len(out) == 6 and out[0] == ref[0]  # the first token survives half precision here


def test_cache_sized_from_memory_fraction(tiny_models):
    llm = LLM(tiny_models["llama"], cache_memory_fraction=0.01, max_batch_size=4)
    total = llm.kv_stats()["total"]
    assert total >= 1
    assert llm.engine.max_model_len <= total * llm.engine.config.block_size
    assert llm.generate([[5, 6]], GREEDY)[0].finish_reason == "length"
