"""Routing policies: choose one worker among the live candidates of one role.

Owns the policy objects and their private state (round-robin counter, the
prefix-hash -> worker table). ``WorkerPool`` builds the candidate list (live, not
suspect, right model and role) and calls ``choose``; a policy never talks to etcd.

- ``round_robin``: rotate over candidates sorted by id.
- ``least_loaded``: lowest load score (see ``Candidate.score``), ties rotated.
- ``prefix_aware``: hash the first ``prefix_blocks`` full blocks of the prompt
  (chained, like the engine's prefix cache); send the request to the worker that
  last served the longest matching prefix unless its score exceeds the best score
  by more than ``overload_margin``; otherwise least loaded. Remembers the choice.

A request naming a LoRA adapter first narrows the candidates to workers that have
it in a device slot (``adapter_affinity``: no swap-in wait), unless they are busier
than the least busy candidate by more than a margin.

Disaggregated requests use two fixed policies: ``MostFreeKV`` picks the decode
worker (most free KV blocks, then fewest running), and ``rank_prefill`` orders
the prefill workers (prefix-cache overlap first via ``prefix_aware``, then
shortest queue) so the decode worker can fall back to the next one.
"""
from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, Sequence

from pdserve.cluster.records import LoadReport, WorkerRecord


@dataclass(frozen=True)
class Candidate:
    record: WorkerRecord
    load: LoadReport
    local_inflight: int  # streams this router has open on the worker right now

    @property
    def score(self) -> int:
        """Outstanding work: the worker's report (about 1 s old) or this router's own count.

        NOTE: max(), not a sum: this router's streams are part of the worker's report.
        """
        return max(self.local_inflight, self.load.running + self.load.waiting)


def adapter_affinity(candidates: Sequence[Candidate], adapter: str | None, margin: int = 4) -> Sequence[Candidate]:
    """The candidates with ``adapter`` resident (from their load reports) when one of them is
    within ``margin`` of the least busy score; otherwise all of them."""
    if adapter is None:
        return candidates
    resident = [c for c in candidates if adapter in c.load.lora_resident]
    if resident and min(c.score for c in resident) <= min(c.score for c in candidates) + margin:
        return resident
    return candidates


class Policy(Protocol):
    def choose(self, candidates: Sequence[Candidate], tokens: Sequence[int]) -> Candidate: ...


class RoundRobin:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Candidate], tokens: Sequence[int]) -> Candidate:
        return candidates[next(self._counter) % len(candidates)]


class LeastLoaded:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Candidate], tokens: Sequence[int]) -> Candidate:
        best = min(c.score for c in candidates)
        tied = [c for c in candidates if c.score == best]
        most_free = max(c.load.kv_blocks_free for c in tied)
        tied = [c for c in tied if c.load.kv_blocks_free == most_free]
        return tied[next(self._counter) % len(tied)]


class PrefixAware:
    def __init__(self, prefix_blocks: int = 8, overload_margin: int = 4, capacity: int = 100_000) -> None:
        self._prefix_blocks = prefix_blocks
        self._margin = overload_margin
        self._capacity = capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()
        self._fallback = LeastLoaded()

    def choose(self, candidates: Sequence[Candidate], tokens: Sequence[int]) -> Candidate:
        hashes = block_hashes(tokens, candidates[0].record.block_size, self._prefix_blocks)
        chosen = self._by_prefix(candidates, hashes)
        if chosen is None:
            chosen = self._fallback.choose(candidates, tokens)
        for h in hashes:
            self._owner[h] = chosen.record.id
            self._owner.move_to_end(h)
        while len(self._owner) > self._capacity:
            self._owner.popitem(last=False)
        return chosen

    def _by_prefix(self, candidates: Sequence[Candidate], hashes: list[bytes]) -> Candidate | None:
        by_id = {c.record.id: c for c in candidates}
        best_score = min(c.score for c in candidates)
        for h in reversed(hashes):  # longest shared prefix first
            owner = by_id.get(self._owner.get(h, ""))
            if owner is not None:
                return owner if owner.score <= best_score + self._margin else None
        return None


def block_hashes(tokens: Sequence[int], block_size: int, max_blocks: int) -> list[bytes]:
    """Chained hashes of the first ``max_blocks`` full blocks (a hash covers its whole prefix)."""
    out: list[bytes] = []
    previous = b""
    for i in range(min(len(tokens) // block_size, max_blocks)):
        block = tokens[i * block_size:(i + 1) * block_size]
        previous = hashlib.blake2b(previous + b",".join(str(t).encode() for t in block), digest_size=16).digest()
        out.append(previous)
    return out


def make_policy(name: str, prefix_blocks: int = 8, overload_margin: int = 4) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name == "prefix_aware":
        return PrefixAware(prefix_blocks, overload_margin)
    raise ValueError(f"unknown routing policy {name!r}")


class MostFreeKV:
    """Decode placement: the most free KV blocks (a decode worker holds every
    request's KV until it ends), then the fewest running requests."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Candidate], tokens: Sequence[int]) -> Candidate:
        key = [(-c.load.kv_blocks_free, c.score) for c in candidates]
        best = min(key)
        tied = [c for c, k in zip(candidates, key) if k == best]
        return tied[next(self._counter) % len(tied)]


def rank_prefill(policy: Policy, candidates: Sequence[Candidate], tokens: Sequence[int], limit: int) -> list[Candidate]:
    """Up to ``limit`` prefill workers: the policy's choice, then the rest by shortest queue."""
    if not candidates or limit < 1:
        return []
    first = policy.choose(candidates, tokens)
    rest = sorted((c for c in candidates if c is not first), key=lambda c: (c.score, -c.load.kv_blocks_free,
                                                                             c.record.id))
    return [first, *rest][:limit]
