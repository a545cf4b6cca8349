"""Validation and tokenization of one request, shared by the gRPC and HTTP APIs.

Turns (model name, prompt, sampling values) into a ``GenerationRequest`` or raises
``RequestError`` (400 / 503) before any worker sees the request: values out of
their range (``validation``), max_tokens over the router's cap, unknown model,
empty or malformed prompt, token ids outside the vocabulary, prompt or
prompt + max_tokens over the context length, invalid sampling values.

Also owns the router's max_tokens policy (``MaxTokensPolicy``): the default of a
request that sets none and the cap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.common.sampling_params import SamplingParams
from pdserve.router.errors import from_value_error, invalid
from pdserve.router.models import ModelCatalog, ModelLimits
from pdserve.router.request_types import GenerationRequest, Prompt
from pdserve.router.validation import INT32_MAX, check_token_ids, check_values


@dataclass(frozen=True)
class MaxTokensPolicy:
    """``--default-max-tokens`` (chat requests without max_tokens; 0 = the rest of the context) and
    ``--max-tokens-cap`` (0 = none but the context). A default is clipped to the cap and the context."""

    chat_default: int = 4096
    cap: int = 0

    def default(self, api_default: int | None, room: int) -> int:
        """``api_default``: the API's own default (16 for completions), None for chat."""
        wanted = self.chat_default if api_default is None else api_default
        return min(wanted or room, self.cap or room, room)

    def check(self, max_tokens: int | None) -> None:
        if self.cap and max_tokens is not None and max_tokens > self.cap:
            raise invalid(f"max_tokens must be at most {self.cap} (this router's --max-tokens-cap), got {max_tokens}",
                          "max_tokens")


async def prepare(catalog: ModelCatalog, request_id: str, model: str | None, prompt: Prompt,
                  values: dict[str, Any], arrival: float, default_max_tokens: int | None = 16,
                  policy: MaxTokensPolicy = MaxTokensPolicy()) -> tuple[GenerationRequest, Any]:
    """Validate and tokenize; returns the request and the model's tokenizer (or None).

    Args:
        values: SamplingParams keyword arguments the client set (``max_tokens`` may be absent).
        default_max_tokens: the API's default when the client gave none (None: chat, ``policy`` decides).
    """
    check_values(values)
    if prompt.token_ids is not None:
        check_token_ids(prompt.token_ids)
    policy.check(values.get("max_tokens"))
    _sampling_params({"max_tokens": INT32_MAX, **values})  # NOTE: a broken rule is a 400 even for an unknown model
    name, adapter = catalog.resolve(model)
    tokenizer = await catalog.tokenizer(name)
    limits = catalog.limits(name)
    tokens = tokenize(tokenizer, prompt)
    check_tokens(tokens, limits)
    values = dict(values)
    room = limits.max_model_len - len(tokens)
    if values.get("max_tokens") is None:
        values["max_tokens"] = policy.default(default_max_tokens, room)
    params = _sampling_params(values)
    if params.max_tokens > room:
        raise invalid(f"this model's maximum context length is {limits.max_model_len} tokens; the prompt has "
                      f"{len(tokens)} tokens and max_tokens is {params.max_tokens}: reduce the prompt or max_tokens",
                      "max_tokens", "context_length_exceeded")
    if params.stop and tokenizer is None:
        raise invalid(f"model {name!r} has no tokenizer, so stop strings cannot be matched", "stop")
    return GenerationRequest(request_id, name, tokens, params, arrival, adapter), tokenizer


def _sampling_params(values: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as exc:
        raise from_value_error(ValueError(str(exc))) from None


def tokenize(tokenizer: Any, prompt: Prompt) -> list[int]:
    if prompt.token_ids is not None:
        if not prompt.token_ids:
            raise invalid("prompt must not be empty", "prompt")
        return list(prompt.token_ids)
    if tokenizer is None:
        raise invalid("this model has no tokenizer: send the prompt as token ids", "prompt")
    if prompt.messages is not None:
        try:
            return tokenizer.encode_chat(prompt.messages)
        except ValueError as exc:
            raise invalid(str(exc), "messages") from None
    if not prompt.text:
        raise invalid("prompt must not be empty", "prompt")
    return tokenizer.encode(prompt.text, add_special_tokens=True)


def check_tokens(tokens: list[int], limits: ModelLimits) -> None:
    if limits.vocab_size is not None:
        bad = [t for t in tokens if not 0 <= t < limits.vocab_size]
        if bad:
            raise invalid(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})", "prompt")
    if len(tokens) >= limits.max_model_len:
        raise invalid(f"the prompt has {len(tokens)} tokens but this model's maximum context length is "
                      f"{limits.max_model_len} tokens (the prompt must leave room for at least one new token)",
                      "prompt", "context_length_exceeded")
