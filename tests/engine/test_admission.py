"""A full KV pool never stalls the decode engine.

Found on a 1P1D cluster with a 64-block decode pool: prompts whose KV had landed
waited behind local requests that could not get blocks (head-of-line), nothing ran,
nothing freed, forever. Here the same situations are built on one engine with a
prefill engine supplying real KV, and every request must finish with the tokens a
single engine gives.
"""
from __future__ import annotations

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
MAX_STEPS = 2_000  # far more than the work needs: reaching it means the engine stalled


def _prompt(i: int, length: int) -> list[int]:
    return [(7 * i + j) % 200 + 50 for j in range(length)]


def _land_kv(p: LLMEngine, d: LLMEngine, rid: str, prompt: list[int]) -> int | None:
    """Reserve on ``d``, compute on ``p`` and copy the KV; the first token (not admitted yet)."""
    reserved = d.reserve_remote(rid, prompt, GREEDY)
    if reserved is None:
        return None
    blocks, cached = reserved
    p.add_request(rid, prompt, GREEDY.replace(max_tokens=1), hold_kv=True)
    first = _drain(p)[rid]
    bs = d.config.block_size
    d.kv_cache[:, blocks[cached // bs:]] = p.kv_cache[:, p.kv.blocks_of(rid)[cached // bs:len(blocks)]]
    assert p.release_held(rid)
    return first[0]


def _drain(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished():
            return tokens
        for out in engine.step():
            tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
    raise AssertionError(f"stalled: {engine.kv_stats()}, waiting {len(engine.scheduler.waiting)}, "
                         f"running {len(engine.scheduler.running)}")


def _expected(path: str, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    outs = LLM(path, num_blocks=256).generate(list(prompts.values()), GREEDY)
    return {rid: o.token_ids for rid, o in zip(prompts, outs)}


def test_landed_kv_is_not_stuck_behind_requests_waiting_for_blocks(tiny_models) -> None:
    path = tiny_models["llama"]
    p, d = LLMEngine(EngineConfig(model=path, num_blocks=64)), LLMEngine(EngineConfig(model=path, num_blocks=16))
    remote = {f"r{i}": _prompt(i, 70) for i in range(3)}  # 5 blocks each: 15 of 16
    local = {f"l{i}": _prompt(10 + i, 70) for i in range(2)}
    firsts = {rid: _land_kv(p, d, rid, prompt) for rid, prompt in remote.items()}
    assert None not in firsts.values() and d.kv_stats()["free"] == 1
    for rid, prompt in local.items():
        d.add_request(rid, prompt, GREEDY)
    d.step()  # the local requests find no blocks; before the fix they blocked the queue's head for good
    got = {rid: [d.admit_remote(rid, first).new_token_ids[0]] for rid, first in firsts.items()}
    for rid, tokens in _drain(d).items():
        got.setdefault(rid, []).extend(tokens)
    assert got == _expected(path, remote | local)
    assert d.kv_stats()["used"] == 0


def test_waiting_requests_holding_every_block_give_them_up(tiny_models) -> None:
    path = tiny_models["qwen3"]
    p, d = LLMEngine(EngineConfig(model=path, num_blocks=64)), LLMEngine(EngineConfig(model=path, num_blocks=8))
    remote = {f"r{i}": _prompt(i, 32) for i in range(4)}  # 2 full blocks each: the whole pool
    firsts = {rid: _land_kv(p, d, rid, prompt) for rid, prompt in remote.items()}
    assert d.kv_stats()["free"] == 0
    # Each admitted request needs a third block for its next token, and none is free.
    got = {rid: [d.admit_remote(rid, first).new_token_ids[0]] for rid, first in firsts.items()}
    for rid, tokens in _drain(d).items():
        got.setdefault(rid, []).extend(tokens)
    assert got == _expected(path, remote)
    assert d.kv_stats()["used"] == 0


def test_no_reservation_jumps_a_queue_that_waits_for_blocks(tiny_models) -> None:
    path = tiny_models["llama"]
    d = LLMEngine(EngineConfig(model=path, num_blocks=8))
    d.add_request("big", _prompt(0, 100), GREEDY)  # 7 blocks
    d.add_request("next", _prompt(1, 100), GREEDY)
    d.step()
    assert d.scheduler.blocked_on_kv and d.kv_stats()["free"] == 1
    assert d.reserve_remote("remote", _prompt(2, 10), GREEDY) is None  # would fit, but others wait first
    assert "remote" not in d.requests
    tokens = _drain(d)
    assert set(tokens) == {"big", "next"} and not d.scheduler.blocked_on_kv
    assert d.reserve_remote("remote", _prompt(2, 10), GREEDY) is not None
    assert d.cancel_remote("remote") and d.kv_stats()["used"] == 0
