"""A step's plan: what the scheduler decided, as plain data the ranks execute.

Owns: ``StepPlan`` and its parts. The engine builds one per step from the
scheduler's decision; the executor hands it to every rank (in process now, over
a pipe to rank processes later), so it holds only ints, strings and
``SamplingParams``, never engine objects. Following vLLM v1, a request is sent
whole once (``NewRequest``: its sampling parameters and the tokens computed
before its first row) and afterwards only as changes: each row's input tokens
and the blocks appended to its table. A rank forgets a request when its id is in
``finished`` (applied before anything else of the plan); a request scheduled
again after that is sent as new.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.common.sampling_params import SamplingParams


@dataclass(frozen=True)
class KVSendOrder:
    """Where a held prompt's KV goes (prefill side of a KV transfer, when the ranks send).

    Each rank writes its heads of blocks ``[skip, len(block_ids))`` of the prompt into
    the matching blocks of worker ``peer``'s ranks, in the step that completes the
    prompt: layer by layer as each is written (``layerwise``) or all after the last.
    """
    peer: str
    block_ids: tuple[int, ...]  # the peer's blocks for the whole prompt
    skip: int  # leading blocks the peer already has
    layerwise: bool = True


@dataclass(frozen=True)
class NewRequest:
    req_id: str
    params: SamplingParams
    num_prompt_tokens: int
    prefix_token_ids: tuple[int, ...]  # tokens before its first row (a prefix-cache hit, or KV from a peer)
    block_ids: tuple[int, ...]  # its whole block table so far
    draws_done: int = 0  # noise draws its seeded generator made before (on a peer, or before a preemption)
    kv_send: KVSendOrder | None = None
    adapter: str | None = None  # LoRA adapter name (None: the base model)


@dataclass(frozen=True)
class PlannedRow:
    """One request's share of the step: tokens ``[start, start + len(token_ids))``."""
    req_id: str
    start: int
    token_ids: tuple[int, ...]
    samples: bool  # the step reaches the request's last token, so a token is sampled
    new_block_ids: tuple[int, ...] = ()  # appended to its table before this step

    @property
    def num_new(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class StepPlan:
    rows: tuple[PlannedRow, ...]
    new_requests: tuple[NewRequest, ...] = ()
    finished: tuple[str, ...] = ()
    # Input rows whose token the previous step sampled and only the device has:
    # input[feed_dst[k]] = previous step's sampled token[feed_src[k]].
    feed_dst: tuple[int, ...] = ()
    feed_src: tuple[int, ...] = ()
    # LoRA adapters to copy from host memory into device slots before the forward: (slot, name).
    adapter_swaps: tuple[tuple[int, str], ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(r.num_new for r in self.rows)


__all__ = ["KVSendOrder", "NewRequest", "PlannedRow", "StepPlan"]
