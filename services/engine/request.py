"""One request's state inside the engine.

Owns: token ids (prompt, then outputs appended in place), how many of them have
KV computed and the finish state (the random generator of a seeded request is
the sampling rank's: ``executor.rank.RankRequest``). Lifecycle:
WAITING -> RUNNING -> FINISHED, with RUNNING -> WAITING on preemption
(recompute: computed tokens drop to 0, outputs are kept). A request whose prompt
KV is supplied from outside enters WAITING with its prompt already computed.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.plan import KVSendOrder


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Request:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 1 << 30
    adapter: str | None = None  # LoRA adapter name (None: the base model)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # time.monotonic() of its first step (set by the asyncio front)
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first admission; -1 until admitted
    status: Status = Status.WAITING
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    hold_kv: bool = False  # keep blocks after finishing (prefill side of a KV transfer)
    kv_send: KVSendOrder | None = None  # the ranks send its KV to a peer (tensor-parallel prefill)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token_id: int) -> None:
        """Add a sampled token and decide whether the request is done."""
        self.token_ids.append(token_id)
        self._check_finish(token_id, len(self.token_ids))

    def set_token(self, pos: int, token_id: int) -> None:
        """Fill in the sampled token at ``pos`` (a place held while the step that
        sampled it ran; later places may already be held too) and decide whether the
        request is done with it."""
        self.token_ids[pos] = token_id
        self._check_finish(token_id, pos + 1)

    def ends_by_length_at(self, num_tokens: int) -> bool:
        """Whether the request is over (max_tokens or the context) once it has num_tokens."""
        return num_tokens - self.num_prompt_tokens >= self.params.max_tokens or num_tokens >= self.max_model_len

    def _check_finish(self, token_id: int, num_tokens: int) -> None:
        p = self.params
        may_stop = num_tokens - self.num_prompt_tokens > p.min_tokens  # NOTE: the sampler masks them before
        if may_stop and (token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids)):
            self.finish_reason = "stop"
        elif self.ends_by_length_at(num_tokens):
            self.finish_reason = "length"
