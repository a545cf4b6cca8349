"""Tensor parallelism on the CPU: two real rank processes over gloo give the tokens one rank gives
and Hugging Face gives (float32, greedy), through chunked prefill, prefix hits and preemption;
a dead rank fails the engine with a clear error and leaves no process behind."""
from __future__ import annotations

import os
import signal
import time

import pytest

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.config import ConfigError, EngineConfig
from pdserve.engine.executor import RankFailure
from tests.engine.conftest import hf_greedy, prompt_set

SLOW = pytest.mark.slow  # in `make test-full` only

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mixtral", pytest.param("qwen2_moe", marks=SLOW),
                                  "qwen3_moe"])  # NOTE: qwen2_moe at tp=2: test_expert_parallel_ep2_matches_hf
def test_tp2_matches_hf_and_tp1(tiny_models, kind):
    from transformers import AutoModelForCausalLM

    path = tiny_models[kind]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    prompts = prompt_set(hf.config.vocab_size, seed=3, lengths=(1, 5, 17, 40, 100))
    expected = hf_greedy(hf, prompts, GREEDY.max_tokens)
    llm = LLM(path, tp=2, num_blocks=64, max_prefill_tokens=48)
    try:
        got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        again = [o.token_ids for o in llm.generate(prompts[2:4], GREEDY)]  # prefix-cache hits
    finally:
        llm.engine.close()
    assert got == expected
    assert again == expected[2:4]


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_expert_parallel_ep2_matches_hf(tiny_models, kind):
    """ep=2 (= tp): each rank holds half of the experts, whole; attention stays tp-split."""
    from transformers import AutoModelForCausalLM

    path = tiny_models[kind]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    prompts = prompt_set(hf.config.vocab_size, seed=11, lengths=(1, 9, 33, 70))
    expected = hf_greedy(hf, prompts, GREEDY.max_tokens)
    llm = LLM(path, tp=2, ep=2, num_blocks=64, max_prefill_tokens=40)
    try:
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
        assert [o.token_ids for o in llm.generate(prompts[2:], GREEDY)] == expected[2:]  # prefix-cache hits
        assert llm.engine.stats()["kv_blocks_used"] == 0
    finally:
        llm.engine.close()


def test_expert_parallel_config_errors(tiny_models):
    with pytest.raises(ConfigError, match="ep=2 with tp=1, dp=1: ep must be 1, tp"):
        EngineConfig(ep=2)
    with pytest.raises(ValueError, match="ep=2 needs a mixture-of-experts model; LlamaForCausalLM has no experts"):
        LLM(tiny_models["llama"], tp=2, ep=2)


def test_tp2_under_preemption(tiny_models):
    path = tiny_models["llama"]
    prompts = [list(range(20 + i, 60 + i)) for i in range(6)]
    expected = [o.token_ids for o in LLM(path, num_blocks=128).generate(prompts, GREEDY)]
    llm = LLM(path, tp=2, num_blocks=20, block_size=8)
    try:
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
        assert llm.engine.stats()["preemptions_total"] > 0
        with pytest.raises(ValueError, match="2 ranks run in processes of their own"):
            llm.engine.local_rank()
    finally:
        llm.engine.close()


def test_a_dead_rank_fails_the_engine_and_no_rank_is_left(tiny_models):
    llm = LLM(tiny_models["llama"], tp=2, num_blocks=32)
    procs = list(llm.engine.executor._procs)
    os.kill(procs[1].pid, signal.SIGKILL)
    with pytest.raises(RankFailure, match="rank 1 exited"):
        llm.generate([[5, 6, 7]], GREEDY)
    with pytest.raises(RankFailure):
        llm.generate([[5, 6, 7]], GREEDY)
    assert not any(p.is_alive() for p in procs)


def test_tp_configurations(tiny_models):
    EngineConfig(tp=2, role="prefill")  # P/D across tp: tests/disagg/test_pd_tp.py
    assert EngineConfig(tp=2, device_type="cuda").collectives == "nccl"
    assert EngineConfig(tp=2).collectives == "gloo"
    assert EngineConfig(tp=2, device_type="cuda", tp_backend="gloo").collectives == "gloo"
    with pytest.raises(ConfigError, match="tp_backend='nccl' needs device_type='cuda', got 'cpu'"):
        EngineConfig(tp=2, tp_backend="nccl")
    with pytest.raises(ConfigError, match="tp_backend"):
        EngineConfig(tp=2, tp_backend="mpi")
    with pytest.raises(ValueError, match="attention heads=4 cannot be split evenly over tp=3"):
        LLM(tiny_models["llama"], tp=3)  # refused before any rank process starts


def test_async_engine_fails_its_streams_and_reports_broken_when_a_rank_dies(tiny_models):
    import asyncio

    from pdserve.engine.async_engine import AsyncEngine

    async def main():
        eng = AsyncEngine(EngineConfig(model=tiny_models["llama"], tp=2, num_blocks=32))
        await eng.start()
        procs = list(eng.engine.executor._procs)
        try:
            stream = eng.generate("r", [5, 6, 7], SamplingParams(max_tokens=10_000, ignore_eos=True))
            await stream.__anext__()
            os.kill(procs[1].pid, signal.SIGKILL)
            with pytest.raises(RuntimeError, match="tensor-parallel group failed"):
                async for _ in stream:
                    pass
            await asyncio.wait_for(eng.broken.wait(), 10)
            with pytest.raises(RuntimeError, match="broken"):
                async for _ in eng.generate("s", [5], GREEDY):
                    pass
        finally:
            await eng.stop()
        assert not any(p.is_alive() for p in procs)
    asyncio.run(main())


def test_ranks_on_one_host_share_the_cache_memory_fraction(tiny_models):
    one = LLM(tiny_models["llama"], cache_memory_fraction=0.01, max_batch_size=4096, max_model_len=2048)
    two = LLM(tiny_models["llama"], tp=2, cache_memory_fraction=0.01, max_batch_size=4096, max_model_len=2048)
    try:
        per_rank = two.engine.block_bytes() * two.kv_stats()["total"]
        whole = one.engine.block_bytes() * one.kv_stats()["total"]
        assert per_rank * 2 <= whole * 1.1  # both ranks together hold what one rank would
    finally:
        two.engine.close()


BF16_TOLERANCE = 0.35  # nats: bf16 rounding alone (one rank) moves these logprobs by up to ~0.25


@pytest.mark.parametrize("kind", ["llama", pytest.param("qwen2", marks=SLOW)])
def test_tp2_bfloat16_logprobs_are_close_to_float32(tiny_models, kind):
    """bfloat16 is not token-exact (tp changes the order of the sums); its logprobs stay within
    BF16_TOLERANCE of the float32 ones, as one rank's bfloat16 logprobs do."""
    from tests.engine.conftest import prompt_set

    prompts = prompt_set(49152, seed=5, lengths=(3, 17, 40, 100))
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    runs = {}
    for tp, dtype in ((1, "float32"), (1, "bfloat16"), (2, "bfloat16")):
        llm = LLM(tiny_models[kind], tp=tp, dtype=dtype, num_blocks=64)
        try:
            runs[(tp, dtype)] = [dict(o.logprobs[0].top) for o in llm.generate(prompts, params)]
        finally:
            llm.engine.close()
    for run in ((1, "bfloat16"), (2, "bfloat16")):
        worst = max(abs(lp - got[tok]) for want, got in zip(runs[(1, "float32")], runs[run])
                    for tok, lp in want.items() if tok in got)
        assert worst <= BF16_TOLERANCE, (run, worst)


def test_a_stuck_rank_fails_the_engine_within_its_rank_timeout(tiny_models):
    """A rank that is alive but stops (SIGSTOP: no exit code, no answer) is caught by its
    peers' collective timeout, not by a long start-up timeout."""
    llm = LLM(tiny_models["llama"], tp=2, num_blocks=32, rank_timeout=3.0)
    procs = list(llm.engine.executor._procs)
    try:
        assert llm.generate([[5, 6, 7]], GREEDY)[0].token_ids
        os.kill(procs[1].pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1 stopped answering"):
            llm.generate([[5, 6, 7]], GREEDY)
        assert time.monotonic() - start < 15.0
        assert not any(p.is_alive() for p in procs)
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
