"""Value types that flow through the router: a prepared request and its output deltas.

A ``GenerationRequest`` is what every API layer produces after validation and
tokenization; ``Delta`` is one step of its output (text and tokens since the
previous delta; the last one has ``finish_reason``, ``usage`` and ``timing``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve.common.sampling_params import SamplingParams


@dataclass(frozen=True)
class Prompt:
    """Exactly one of the three is set."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    token_ids: list[int] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float  # time.monotonic() when the router received the request
    adapter: str | None = None  # LoRA adapter (None: the base model)

    @property
    def served_name(self) -> str:
        """The name the client asked for and responses echo: the adapter's, else the model's."""
        return self.adapter or self.model


@dataclass(frozen=True)
class TopToken:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[TopToken] = field(default_factory=list)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timing:
    time_to_first_token: float
    queue: float
    worker_first_token: float
    total: float


@dataclass
class Delta:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    timing: Timing | None = None
    worker_id: str = ""
    prefill_worker_id: str = ""  # "" when worker_id computed the prompt


def merge(deltas: list[Delta]) -> Delta:
    """All deltas of a request as one (the non-streaming response)."""
    out = Delta()
    for d in deltas:
        out.text += d.text
        out.token_ids += d.token_ids
        out.logprobs += d.logprobs
        out.finish_reason = d.finish_reason or out.finish_reason
        out.usage = d.usage or out.usage
        out.timing = d.timing or out.timing
        out.worker_id = d.worker_id or out.worker_id
        out.prefill_worker_id = d.prefill_worker_id or out.prefill_worker_id
    return out
