"""Overlapped steps (``async_scheduling``): step N+1 launched before step N's tokens are
read gives exactly the tokens of the plain loop, for every kind of request, and
frees every block, also when requests end or are aborted while a step is in flight.

On CPU the overlap has no speed benefit (the device is the host) but runs the same
code, so these tests force it on; on a GPU it is the default.
"""
from __future__ import annotations

import pytest

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from tests.engine.conftest import DEVICES, prompt_set


def _engine(path: str, device: str, overlap: bool, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, device_type=device, async_scheduling=overlap, num_blocks=256,
                                  max_batch_size=8, **kw))


def _params() -> list[SamplingParams]:
    """Greedy, seeded random, top-k/p, stop ids, short and long outputs, penalties and logprobs."""
    return [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=9, temperature=0.8, seed=11, ignore_eos=True),
            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=15, temperature=1.0, top_k=20, top_p=0.9, seed=5, ignore_eos=True),
            SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[7, 300, 1024], ignore_eos=True),
            SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
            SamplingParams(max_tokens=5, temperature=0.0, logprobs=2, ignore_eos=True),
            SamplingParams(max_tokens=20, temperature=0.7, seed=3, ignore_eos=True)]


def _run(engine: LLMEngine, prompts, params, abort_at: dict[str, int] | None = None) -> dict[str, list[int]]:
    abort_at = abort_at or {}
    tokens: dict[str, list[int]] = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
        tokens[f"r{i}"] = []
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.req_id] += out.new_token_ids
        steps += 1
        for rid, at in abort_at.items():
            if at == steps:
                engine.abort(rid)
    assert engine.kv_stats()["used"] == 0, engine.kv_stats()
    assert not engine.requests
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_overlap_gives_the_same_tokens_for_every_kind_of_request(tiny_models, device):
    prompts = prompt_set(49152, seed=3)
    params = _params()
    first = _run(_engine(tiny_models["llama"], device, False), prompts, params)
    params[4] = params[4].replace(stop_token_ids=[first["r4"][4]])  # ends mid-run, with a step in flight
    plain = _run(_engine(tiny_models["llama"], device, False), prompts, params)
    assert len(plain["r4"]) <= 5
    overlapped_engine = _engine(tiny_models["llama"], device, True)
    overlapped = _run(overlapped_engine, prompts, params)
    assert overlapped == plain
    assert overlapped_engine.stats()["overlapped_steps_total"] > 0
    assert [len(plain[f"r{i}"]) for i in range(len(params))][:4] == [12, 9, 1, 15]


@pytest.mark.parametrize("device", DEVICES)
def test_abort_while_a_step_is_in_flight_frees_its_blocks_after_it(tiny_models, device):
    prompts = prompt_set(49152, seed=4)
    params = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)] * len(prompts)
    plain = _run(_engine(tiny_models["llama"], device, False), prompts, params)
    engine = _engine(tiny_models["llama"], device, True)
    got = _run(engine, prompts, params, abort_at={"r1": 4, "r5": 9, "r6": 15})
    for rid in got:
        if rid in ("r1", "r5", "r6"):
            assert got[rid] == plain[rid][:len(got[rid])] and len(got[rid]) < 30
        else:
            assert got[rid] == plain[rid]


def test_blocks_of_a_request_ending_in_flight_wait_for_the_step(tiny_models):
    engine = _engine(tiny_models["llama"], "cpu", True)
    stop_at_first = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    engine.add_request("long", list(range(100, 140)), SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    engine.add_request("short", list(range(200, 237)), stop_at_first)
    while not engine.requests["short"].num_output_tokens:
        engine.step()
    engine.step()  # launches the next step, then reads the previous one
    assert engine._launched is not None and "short" in engine._launched.req_ids
    engine.abort("short")  # in flight: its blocks must outlive the launched step
    assert engine.kv.has("short") and engine._launched.free_after == ["short"]
    engine.step()
    assert not engine.kv.has("short")
    engine.abort("long")
    while engine.has_unfinished():
        engine.step()
    assert engine.kv_stats()["used"] == 0


def test_a_failed_overlapped_step_frees_the_blocks_of_requests_that_ended_during_it(tiny_models):
    """A request aborted while its step is in flight keeps its blocks until that step is done;
    if reading that step fails, ``fail_all`` must still free them."""
    engine = LLMEngine(EngineConfig(model=tiny_models["llama"], num_blocks=64, async_scheduling=True))
    for rid in ("a", "b"):
        engine.add_request(rid, [5, 6, 7], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    engine.step()  # the next step is already launched (overlap)
    assert engine.counters.overlapped_steps_total > 0
    assert engine.abort("b")  # its blocks now wait for the step in flight

    def broken(pending):
        raise RuntimeError("simulated device failure")
    engine.executor.collect = broken
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    assert sorted(engine.fail_all()) == ["a"]
    assert engine.kv_stats()["used"] == 0
