"""Shared fixtures for engine tests: the default model, tiny random HF checkpoints, and HF references."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from services.common.model_source import resolve_model
from services.common.tokenizer import tokenizer_dir

TINY_CONFIGS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  rope_theta=10000.0, tie_word_embeddings=False,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=256)),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=2048,
                  tie_word_embeddings=True, use_sliding_window=False),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=2048, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=2048, sliding_window=None, tie_word_embeddings=False),
}


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    return os.path.dirname(resolve_model("smollm2").path)


@pytest.fixture(scope="session")
def smollm2_hf():
    from transformers import AutoModelForCausalLM

    src = resolve_model("smollm2")
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(src.path), gguf_file=os.path.basename(src.path),
                                                 dtype=torch.float32)
    return model.eval()


def make_tiny_model(kind: str, directory: str) -> str:
    """Save a random-weight HF checkpoint (with the SmolLM2 tokenizer) and return its path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(TINY_CONFIGS[kind])
    model_type = values.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=49152, bos_token_id=1, eos_token_id=2,
                               initializer_range=0.5, **values)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = os.path.join(directory, kind)
    model.save_pretrained(path)
    tok = tokenizer_dir(resolve_model("smollm2"))
    for name in os.listdir(tok):
        shutil.copy(os.path.join(tok, name), path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: make_tiny_model(kind, str(root)) for kind in TINY_CONFIGS}


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy generate, one prompt at a time (no padding), new tokens only, up to and incl. EOS."""
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=model.generation_config.eos_token_id)
        outs.append(y[0, len(ids):].tolist())
    return outs


def prompt_set(vocab: int, seed: int, lengths=(1, 5, 16, 17, 40, 100, 257, 333)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
