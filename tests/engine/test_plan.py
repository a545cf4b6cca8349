"""The plan the engine sends its ranks: plain data (it pickles), each request sent whole once and
then only as changes, preempted requests sent again, and the ranks' view always equal to the
scheduler's (tokens and block tables). Seeded sampling survives preemption and P/D hand-over."""
from __future__ import annotations

import pickle

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine import LLM
from pdserve.engine.engine import LLMEngine
from pdserve.engine.plan import StepPlan

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


class _Recorder:
    """Wraps the engine's executor: checks each plan against the engine's own state."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.real = engine, engine.executor.execute
        self.tokens: dict[str, list[int]] = {}
        self.tables: dict[str, list[int]] = {}
        self.sent_new: dict[str, int] = {}
        self.plans = 0

    def __call__(self, plan: StepPlan):
        assert pickle.loads(pickle.dumps(plan)) == plan
        for rid in plan.finished:
            self.tokens.pop(rid, None)
            self.tables.pop(rid, None)
        for new in plan.new_requests:
            self.tokens[new.req_id], self.tables[new.req_id] = list(new.prefix_token_ids), list(new.block_ids)
            self.sent_new[new.req_id] = self.sent_new.get(new.req_id, 0) + 1
        for row in plan.rows:
            assert len(self.tokens[row.req_id]) == row.start
            self.tokens[row.req_id] += row.token_ids
            self.tables[row.req_id] += row.new_block_ids
            req = self.engine.requests[row.req_id]
            assert self.tables[row.req_id] == self.engine.kv.blocks_of(row.req_id)
            assert self.tokens[row.req_id] == req.token_ids[:row.start + row.num_new]
        self.plans += 1
        return self.real(plan)


def _run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], _Recorder]:
    rec = _Recorder(llm.engine)
    llm.engine.executor.execute = rec
    outs = llm.generate(prompts, params)
    return [o.token_ids for o in outs], rec


def test_requests_are_sent_once_and_then_as_changes(tiny_models):
    prompts = [list(range(10, 10 + n)) for n in (3, 40, 17)] + [list(range(10, 50))]  # the last hits the cache
    tokens, rec = _run(LLM(tiny_models["llama"], num_blocks=64, max_prefill_tokens=24), prompts, GREEDY)
    assert rec.plans > 12 and all(n == 1 for n in rec.sent_new.values())
    assert tokens == [o.token_ids for o in LLM(tiny_models["llama"], num_blocks=64).generate(prompts, GREEDY)]


def test_preempted_requests_are_sent_again_and_seeded_sampling_is_unchanged(tiny_models):
    prompts = [list(range(20 + i, 60 + i)) for i in range(6)]
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_k=20, seed=11, ignore_eos=True)
    roomy = [o.token_ids for o in LLM(tiny_models["llama"], num_blocks=128).generate(prompts, seeded)]
    tight = LLM(tiny_models["llama"], num_blocks=20, block_size=8)
    tokens, rec = _run(tight, prompts, seeded)
    assert tight.engine.stats()["preemptions_total"] > 0 and max(rec.sent_new.values()) > 1
    assert tokens == roomy


def test_a_landed_seeded_request_samples_as_if_served_by_one_engine(tiny_models):
    path, prompt = tiny_models["llama"], list(range(30, 75))
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    whole = LLM(path, num_blocks=64).generate([prompt], seeded)[0].token_ids
    p, d = LLM(path, num_blocks=64).engine, LLM(path, num_blocks=64).engine
    blocks, cached = d.reserve_remote("r", prompt, seeded)
    p.add_request("r", prompt, seeded.replace(max_tokens=1), hold_kv=True)
    first = None
    while p.has_unfinished():
        for out in p.step():
            first = out.new_token_ids[0]
    d.kv_cache[:, blocks] = p.kv_cache[:, p.kv.blocks_of("r")[:len(blocks)]]
    p.release_held("r")
    got = d.admit_remote("r", first).new_token_ids
    while d.has_unfinished():
        got += [t for out in d.step() for t in out.new_token_ids]
    assert got == whole
