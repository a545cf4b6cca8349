"""Parsing and validating OpenAI-style request bodies (``/v1/completions`` and
``/v1/chat/completions``) into router values; raises ``RequestError`` (400) naming
the offending field for malformed, unknown or unsupported fields.

Accepted: the OpenAI fields pdserve implements, vLLM-style extras (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, include_stop_str_in_output), and
fields with no effect on generation (user, metadata, store=false, service_tier).
Fields OpenAI defines but pdserve does not implement are accepted only at their
default value (e.g. n=1, echo=false, no tools); anything else is a 400. Numeric
ranges and chat roles are the ones gRPC has too (``validation``); ``prepare``
checks the sampling values of both APIs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pdserve.router.errors import invalid, shown
from pdserve.router.request_types import Prompt
from pdserve.router.validation import INT_BOUNDS, check_int, check_messages

_SAMPLING = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop", "top_k", "min_p",
             "repetition_penalty", "ignore_eos", "stop_token_ids", "include_stop_str_in_output", "min_tokens")
_COMMON = ("model", "stream", "stream_options", "max_tokens", "user", "metadata", "service_tier") + _SAMPLING
_COMPLETION = _COMMON + ("prompt", "logprobs")
_CHAT = _COMMON + ("messages", "max_completion_tokens", "logprobs", "top_logprobs")

# Defined by OpenAI, not implemented: allowed only when the value means "off".
_ONLY_DEFAULT: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v in (None, 1),
    "best_of": lambda v: v in (None, 1),
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: v in (None, ""),
    "logit_bias": lambda v: not v,
    "store": lambda v: v in (None, False),
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v in (None, {"type": "text"}),
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
}

_NUMBER = ((int, float), "a number")
_INT = ((int,), "an integer")
_BOOL = ((bool,), "a boolean")
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a string"), "stream": _BOOL, "stream_options": ((dict,), "an object"),
    "max_tokens": _INT, "max_completion_tokens": _INT, "temperature": _NUMBER, "top_p": _NUMBER,
    "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER, "seed": _INT, "top_k": _INT, "min_p": _NUMBER,
    "repetition_penalty": _NUMBER, "ignore_eos": _BOOL, "min_tokens": _INT, "include_stop_str_in_output": _BOOL,
    "stop": ((str, list), "a string or a list of strings"), "stop_token_ids": ((list,), "a list of integers"),
    "user": ((str,), "a string"), "top_logprobs": _INT, "messages": ((list,), "a list of messages"),
    "prompt": ((str, list), "a string or a list of token ids"),
}


@dataclass(frozen=True)
class OpenAIRequest:
    kind: str  # "completion" | "chat"
    model: str
    prompt: Prompt
    values: dict[str, Any]  # SamplingParams keyword arguments the client set
    stream: bool
    include_usage: bool
    default_max_tokens: int | None  # 16 for completions (OpenAI); None for chat (the router's --default-max-tokens)


def parse_completion(body: Any) -> OpenAIRequest:
    _check_fields(body, _COMPLETION)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        check_int("logprobs", logprobs, INT_BOUNDS["logprobs"])
    values = _sampling_values(body, body.get("max_tokens"), "max_tokens")
    if logprobs is not None:
        values["logprobs"] = logprobs
    return OpenAIRequest("completion", body["model"], _completion_prompt(body.get("prompt")), values,
                         *_stream_flags(body), default_max_tokens=16)


def parse_chat(body: Any) -> OpenAIRequest:
    _check_fields(body, _CHAT)
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    values = _sampling_values(body, body.get(max_key), max_key)
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise invalid(f"logprobs must be a boolean, got {shown(logprobs)}", "logprobs")
    if top is not None:
        check_int("top_logprobs", top, INT_BOUNDS["logprobs"])
    if top is not None and not logprobs:
        raise invalid("top_logprobs requires logprobs=true", "top_logprobs")
    if logprobs:
        values["logprobs"] = top or 0
    return OpenAIRequest("chat", body["model"], Prompt(messages=_messages(body.get("messages"))), values,
                         *_stream_flags(body), default_max_tokens=None)


def _check_fields(body: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    unknown = sorted(k for k in body if k not in allowed and k not in _ONLY_DEFAULT)
    if unknown:
        raise invalid(f"unrecognized request argument(s): {', '.join(shown(k)[1:-1] for k in unknown[:8])}",
                      shown(unknown[0])[1:-1], "unknown_parameter")
    for name, ok in _ONLY_DEFAULT.items():
        if name in body and not ok(body[name]):
            raise invalid(f"{name}={shown(body[name])} is not supported by pdserve", name, "unsupported_parameter")
    for name, (types, what) in _TYPES.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise invalid(f"{name} must be {what}, got {shown(value)}", name, "invalid_type")
    if not body.get("model"):
        raise invalid("model is required", "model", "missing_required_parameter")


def _sampling_values(body: dict[str, Any], max_tokens: Any, max_key: str) -> dict[str, Any]:
    values = {k: body[k] for k in _SAMPLING if body.get(k) is not None}
    if max_tokens is not None:
        values["max_tokens"] = check_int(max_key, max_tokens, INT_BOUNDS["max_tokens"])
    stop = values.get("stop")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise invalid(f"stop must be a string or a list of strings, got {shown(stop)}", "stop", "invalid_type")
    ids = values.get("stop_token_ids", [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise invalid(f"stop_token_ids must be a list of integers, got {shown(ids)}", "stop_token_ids",
                      "invalid_type")
    return values


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(body.get("stream"))
    options = body.get("stream_options") or {}
    if options and not stream:
        raise invalid("stream_options is only allowed with stream=true", "stream_options")
    unknown = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
    if unknown:
        raise invalid(f"unrecognized stream_options: {shown(unknown)}", "stream_options")
    for name, value in options.items():
        if value is not None and not isinstance(value, bool):
            raise invalid(f"stream_options.{name} must be a boolean, got {shown(value)}", f"stream_options.{name}",
                          "invalid_type")
    return stream, bool(options.get("include_usage"))


def _completion_prompt(prompt: Any) -> Prompt:
    if prompt is None:
        raise invalid("prompt is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return Prompt(text=prompt)
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return Prompt(token_ids=list(prompt))
    if prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise invalid("batched prompts are not supported: send one prompt per request", "prompt",
                      "unsupported_parameter")
    raise invalid("prompt must be a non-empty string or a list of token ids", "prompt")


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
        unknown = sorted(k for k in m if k not in ("role", "content", "name") and m[k] not in (None, "", [], {}))
        if unknown:
            raise invalid(f"messages[{i}] has unsupported field(s): {shown(unknown)}", f"messages[{i}]",
                          "unsupported_parameter")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return check_messages(out)


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
