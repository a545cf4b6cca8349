"""Continuous-batching scheduler: which requests compute how many tokens this step.

Owns: the waiting queue and the running list, and the decisions on them. It knows
no phases: a request has ``num_tokens`` and ``num_computed_tokens``, and each step
gets ``min(num_tokens - num_computed_tokens, budget left)`` tokens. A prefill
chunk, a whole prompt, a decode step, a prefix-cache hit and a prompt whose KV
came from another worker are all the same thing seen through those two numbers.

Per step: running requests first (FCFS), preempting the newest by recompute when
the KV pool runs dry; then waiting requests while the token budget, the batch
size and the pool allow.

NOTE (progress): a waiting request may hold blocks (a prompt whose KV arrived from
a peer, ``add(front=True)``). When nothing runs and the head of the queue does not
fit, the blocks of waiting requests behind it are taken (newest first; they
recompute later), so some request can always run while any request fits the pool
(``max_model_len`` is capped by the pool, so every accepted request fits alone).
``blocked_on_kv`` says the head is waiting for blocks, so the engine stops
reserving blocks for new remote prefills that would jump the queue.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache import KVCacheManager
from pdserve.engine.lora.residency import AdapterResidency
from pdserve.engine.request import Request, Status


@dataclass(frozen=True)
class ScheduledSeq:
    req: Request
    start: int  # tokens already computed before this step
    num_new: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the request's tokens (and so samples)."""
        return self.start + self.num_new == self.req.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    seqs: tuple[ScheduledSeq, ...]
    preempted: tuple[str, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, adapters: AdapterResidency | None = None):
        self.config = config
        self.kv = kv
        self.adapters = adapters  # LoRA device slots (None: LoRA off)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.blocked_on_kv = False

    def add(self, req: Request, front: bool = False) -> None:
        req.status = Status.WAITING
        if front:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, ending: frozenset[str] = frozenset()) -> SchedulerOutput:
        """``ending``: running requests left out of this step because they are known to
        end with a token the device is still computing."""
        budget = self.config.max_prefill_tokens
        seqs: list[ScheduledSeq] = []
        preempted: list[str] = []
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not Status.RUNNING or req.req_id in ending:
                continue  # preempted earlier in this loop, or ending
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._allocate_or_preempt(req, n, preempted):
                continue
            seqs.append(ScheduledSeq(req, req.num_computed_tokens, n))
            budget -= n
        if not preempted:
            budget = self._admit_waiting(budget, seqs)
        return SchedulerOutput(tuple(seqs), tuple(preempted))

    def _allocate_or_preempt(self, req: Request, n: int, preempted: list[str]) -> bool:
        while not self.kv.allocate_slots(req.req_id, req.num_computed_tokens + n):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim.req_id)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.req_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.add(req, front=True)

    def _admit_waiting(self, budget: int, seqs: list[ScheduledSeq]) -> int:
        self.blocked_on_kv = False
        no_slot: list[Request] = []  # their adapter cannot get a device slot this step: they wait, others go
        try:
            return self._admit(budget, seqs, no_slot)
        finally:
            self.waiting.extendleft(reversed(no_slot))  # NOTE: first in line again next step

    def _admit(self, budget: int, seqs: list[ScheduledSeq], no_slot: list[Request]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            req = self.waiting[0]
            if not self._adapter_resident(req):
                no_slot.append(self.waiting.popleft())
                continue
            matched_now = not self.kv.has(req.req_id)
            if matched_now:
                req.num_computed_tokens = self.kv.match_prefix(req.req_id, req.token_ids, req.adapter or "")
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = req.num_computed_tokens
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate_slots(req.req_id, req.num_computed_tokens + n):
                if matched_now:  # hold nothing while waiting
                    self.kv.free(req.req_id)
                    req.num_computed_tokens = 0
                if not self.running and self._take_blocks_behind(req):
                    continue
                self.blocked_on_kv = True
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            seqs.append(ScheduledSeq(req, req.num_computed_tokens, n))
            budget -= n
        return budget

    def _adapter_resident(self, req: Request) -> bool:
        """Whether ``req``'s adapter has (or now gets) a device slot: a free one, or one whose
        adapter no running request uses."""
        if req.adapter is None or self.adapters is None:
            return True
        return self.adapters.claim(req.adapter, {r.adapter for r in self.running if r.adapter})

    def _take_blocks_behind(self, head: Request) -> bool:
        """Free the blocks of the newest waiting request that holds any (it recomputes
        later); False when none behind ``head`` holds blocks."""
        for req in reversed(self.waiting):
            if req is not head and self.kv.has(req.req_id):
                self.kv.free(req.req_id)
                req.num_computed_tokens = 0
                req.num_preemptions += 1
                return True
        return False

    def finish(self, req: Request, reason: str, free_kv: bool = True) -> None:
        """Remove a request wherever it is and (unless told not to) free its blocks."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING and req in self.waiting:
            self.waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = req.finish_reason or reason
        if free_kv:
            self.kv.free(req.req_id)
