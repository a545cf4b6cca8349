"""Expert parallelism across data-parallel replicas (ep = dp x tp) on the CPU: two replica
engines in two processes (with tp = 2: each with two rank processes), each with its own
requests and KV cache, share the MoE layers over gloo (each rank holds 1/ep of the experts). Every replica's greedy tokens equal Hugging Face's
(float32), also when one replica runs out of work early and only lends its experts, through
chunked prefill and prefix-cache hits; KV blocks all free at the end; no process left."""
from __future__ import annotations

import multiprocessing as mp
import socket

import pytest

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.config import ConfigError, EngineConfig
from tests.engine.conftest import hf_greedy, prompt_set

SLOW = pytest.mark.slow  # in `make test-full` only

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica(path: str, rank: int, port: int, tp: int, rounds: list[list[list[int]]], params: list[SamplingParams],
             out: mp.Queue, all_to_all: int) -> None:
    """One replica: generate each round of prompts, then report the tokens, the KV blocks still
    used and its expert-only steps."""
    try:
        llm = LLM(path, tp=tp, dp=2, ep=2 * tp, dp_rank=rank, dp_port=port, num_blocks=64, max_prefill_tokens=24,
                  expert_all_to_all_tokens=all_to_all)
        try:
            got = [[o.token_ids for o in llm.generate(prompts, p)] for prompts, p in zip(rounds, params)]
            stats = llm.engine.stats()
            out.put((rank, got, (stats["kv_blocks_used"], stats["expert_only_steps_total"])))
        finally:
            llm.engine.close()
    except BaseException as exc:  # NOTE: reported, so the test fails with the reason, not a timeout
        out.put((rank, f"{type(exc).__name__}: {exc}", None))


def _run_replicas(path: str, rounds: dict[int, list[list[list[int]]]], params: dict[int, list[SamplingParams]],
                  tp: int = 1, timeout: float = 240, all_to_all: int = 256) -> dict:
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_replica, args=(path, r, port, tp, rounds[r], params.get(r, [GREEDY] * len(rounds[r])),
                                                out, all_to_all)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in procs:
            rank, got, used = out.get(timeout=timeout)
            results[rank] = (got, used)
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return results


# all_to_all: the step size from which MoE layers exchange tokens all-to-all: 256 = never here (steps
# of at most 24 tokens: the padded gather), 0 = always, 8 = prefill steps all-to-all, decode gathered
# NOTE: each model and each exchange (all-to-all from 256 tokens, all-gather below) once in
# `make test`; the other pairings in `make test-full`
@pytest.mark.parametrize("kind,tp,all_to_all", [("mixtral", 1, 256), pytest.param("qwen2_moe", 1, 256, marks=SLOW),
                                                pytest.param("qwen3_moe", 1, 256, marks=SLOW),
                                                pytest.param("mixtral", 2, 256, marks=SLOW), ("qwen3_moe", 1, 0),
                                                ("qwen2_moe", 1, 8), ("mixtral", 2, 8)])
def test_replicas_sharing_experts_match_hf(tiny_models, kind, tp, all_to_all):
    from transformers import AutoModelForCausalLM

    path = tiny_models[kind]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    prompts = prompt_set(hf.config.vocab_size, seed=5, lengths=(1, 9, 33, 70, 4))
    expected = hf_greedy(hf, prompts, GREEDY.max_tokens)
    # replica 0: three prompts, then two of them again (prefix hits); replica 1: two, then one
    # that ends early, so it idles (lending its experts) while replica 0 still runs
    rounds = {0: [prompts[:3], prompts[1:3]], 1: [prompts[3:], [prompts[4][:1]]]}
    expected_short = hf_greedy(hf, [prompts[4][:1]], 3)
    results = _run_replicas(path, rounds, params={1: [GREEDY, SamplingParams(max_tokens=3, temperature=0.0)]}, tp=tp,
                            all_to_all=all_to_all)
    for rank in (0, 1):
        got, (used, _) = results[rank]
        assert not isinstance(got, str), f"replica {rank}: {got}"
        assert used == 0, f"replica {rank}: {used} KV blocks still used"
    assert results[1][1][1] > 0  # steps where replica 1 had no tokens and only ran its experts for replica 0
    assert results[0][0] == [expected[:3], expected[1:3]]
    assert results[1][0] == [expected[3:], expected_short]


def test_replica_config_errors(tiny_models):
    with pytest.raises(ConfigError, match="ep=4 with tp=1, dp=2: ep must be 1, tp"):
        EngineConfig(dp=2, ep=4)
    with pytest.raises(ConfigError, match="dp_rank"):
        EngineConfig(dp=2, ep=2, dp_rank=2)
    with pytest.raises(ConfigError, match="expert_all_to_all_tokens=-1 is invalid"):
        EngineConfig(dp=2, ep=2, expert_all_to_all_tokens=-1)
    with pytest.raises(ConfigError, match="runs on cpu in this version"):
        EngineConfig(dp=2, ep=2, device_type="cuda")
    with pytest.raises(ValueError, match="dp_port .* is not set"):
        LLM(tiny_models["mixtral"], dp=2, ep=2)
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        LLM(tiny_models["llama"], dp=2, ep=2, dp_port=_free_port())
