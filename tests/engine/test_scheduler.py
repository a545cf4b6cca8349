"""Scheduler unit tests: token budget, chunking, mixed steps, batch cap, FCFS, preemption (no model)."""
from __future__ import annotations

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache import KVCacheManager
from pdserve.engine.request import Request, Status
from pdserve.engine.scheduler import Scheduler


def _sched(budget=32, batch=4, blocks=64, bs=4) -> Scheduler:
    return Scheduler(SchedulerConfig(batch, budget, 1024), KVCacheManager(blocks, bs))


def _req(rid: str, n: int) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=100, ignore_eos=True))


def _advance(s: Scheduler, out) -> None:
    """What the engine does after a step: count computed tokens, append one token when sampling."""
    for seq in out.seqs:
        seq.req.num_computed_tokens = seq.start + seq.num_new
        if seq.samples:
            seq.req.token_ids.append(7)


def test_chunked_prefill_under_budget_then_mixed_with_decode():
    s = _sched(budget=32)
    a, b = _req("a", 20), _req("b", 50)
    s.add(a), s.add(b)
    out = s.schedule()
    assert [(q.req.req_id, q.start, q.num_new) for q in out.seqs] == [("a", 0, 20), ("b", 0, 12)]
    assert out.seqs[0].samples and not out.seqs[1].samples
    _advance(s, out)
    out = s.schedule()  # a decodes one token while b continues its prompt: one mixed step
    assert [(q.req.req_id, q.num_new) for q in out.seqs] == [("a", 1), ("b", 31)]
    _advance(s, out)
    out = s.schedule()
    assert [(q.req.req_id, q.num_new) for q in out.seqs] == [("a", 1), ("b", 7)] and out.seqs[1].samples


def test_batch_cap_and_fcfs():
    s = _sched(budget=1000, batch=2)
    reqs = [_req(f"r{i}", 5) for i in range(4)]
    for r in reqs:
        s.add(r)
    out = s.schedule()
    assert [q.req.req_id for q in out.seqs] == ["r0", "r1"]
    assert [r.req_id for r in s.waiting] == ["r2", "r3"]
    s.finish(reqs[0], "stop")
    _advance(s, out)
    out = s.schedule()
    assert [q.req.req_id for q in out.seqs] == ["r1", "r2"]


def test_preemption_by_recompute_when_blocks_run_out():
    s = _sched(budget=1000, batch=4, blocks=5, bs=4)
    a, b = _req("a", 8), _req("b", 8)  # 2 blocks each
    s.add(a), s.add(b)
    _advance(s, s.schedule())
    for _ in range(4):  # grow until a third block is needed for both: only one fits
        out = s.schedule()
        _advance(s, out)
    assert b.num_preemptions >= 1 and b.status is Status.WAITING and b.num_computed_tokens == 0
    assert a.status is Status.RUNNING
    assert s.kv.stats()["used"] == len(s.kv.blocks_of("a"))
    s.finish(a, "stop")
    out = s.schedule()  # b comes back and recomputes prompt + the tokens it had generated
    assert out.seqs[0].req is b and out.seqs[0].start == 0 and out.seqs[0].num_new == b.num_tokens


def test_waiting_request_holds_no_blocks_when_pool_is_short():
    s = _sched(budget=1000, batch=4, blocks=3, bs=4)
    a, b = _req("a", 10), _req("b", 10)  # 3 blocks each
    s.add(a), s.add(b)
    out = s.schedule()
    assert [q.req.req_id for q in out.seqs] == ["a"]
    assert s.kv.blocks_of("b") == [] and b.num_computed_tokens == 0
