"""Tensor parallelism on CUDA: two rank processes give the tokens Hugging Face gives (float32,
greedy). With gloo the two ranks share one GPU (any CUDA machine; steps run eagerly); with NCCL
each rank has its own GPU and decode steps replay as CUDA graphs with the all-reduce inside
(machines with two GPUs). A dead rank fails the engine and leaves no process behind."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.executor import RankFailure
from tests.engine.conftest import HAS_CUDA, hf_greedy, prompt_set

TWO_GPUS = HAS_CUDA and torch.cuda.device_count() >= 2
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
needs_two_gpus = pytest.mark.skipif(not TWO_GPUS, reason="NCCL needs a GPU per rank: two GPUs")

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def expected_tokens(path: str, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    prompts = prompt_set(hf.config.vocab_size, seed=seed, lengths=(1, 5, 17, 40, 100))
    return prompts, hf_greedy(hf, prompts, GREEDY.max_tokens)


def generate_twice(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """All prompts, then two again (prefix-cache hits); every block is free at the end."""
    try:
        got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        again = [o.token_ids for o in llm.generate(prompts[2:4], GREEDY)]
        assert llm.engine.stats()["kv_blocks_used"] == 0
    finally:
        llm.engine.close()
    return got, again


@pytest.mark.parametrize("kind,ep", [("llama", 1), ("qwen2", 1), ("qwen3", 1), ("qwen3_moe", 1), ("qwen3_moe", 2)])
def test_tp2_ranks_sharing_one_gpu_match_hf(tiny_models, kind, ep):
    prompts, expected = expected_tokens(tiny_models[kind], seed=3)
    llm = LLM(tiny_models[kind], tp=2, ep=ep, device_type="cuda", tp_backend="gloo", num_blocks=64,
              max_prefill_tokens=48)
    got, again = generate_twice(llm, prompts)
    assert got == expected
    assert again == expected[2:4]


@needs_two_gpus
@pytest.mark.parametrize("kind,ep", [("llama", 1), ("qwen2", 1), ("qwen3_moe", 2)])
def test_tp2_nccl_with_decode_graphs_matches_hf_and_eager(tiny_models, kind, ep):
    prompts, expected = expected_tokens(tiny_models[kind], seed=5)
    for eager in (False, True):
        llm = LLM(tiny_models[kind], tp=2, ep=ep, device_type="cuda", num_blocks=64, max_prefill_tokens=48,
                  enforce_eager=eager)
        got, again = generate_twice(llm, prompts)
        assert got == expected, f"enforce_eager={eager}"
        assert again == expected[2:4]


@needs_two_gpus
def test_a_dead_nccl_rank_fails_the_engine_and_no_rank_is_left(tiny_models):
    llm = LLM(tiny_models["llama"], tp=2, device_type="cuda", num_blocks=32)
    procs = list(llm.engine.executor._procs)
    os.kill(procs[1].pid, signal.SIGKILL)
    with pytest.raises(RankFailure, match="rank 1 exited"):
        llm.generate([[5, 6, 7]], GREEDY)
    llm.engine.close()
    assert not any(p.is_alive() for p in procs)
