"""Building OpenAI-shaped response bodies (completion, chat completion, their stream
chunks, usage and logprobs) from router ``Delta`` values. Pure functions.
"""
from __future__ import annotations

from typing import Any

from pdserve.router.request_types import Delta, TokenLogprob, Usage


def usage_json(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions shape; ``offset`` is the text offset of the first token."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries], "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t.token, t.logprob) for t in e.top]}
                        for e in entries]}


class ResponseBuilder:
    """Bodies of one request's response; keeps the text offset for streamed logprobs."""

    def __init__(self, kind: str, response_id: str, model: str, created: int, want_logprobs: bool) -> None:
        self.kind, self.id, self.model, self.created = kind, response_id, model, created
        self.want_logprobs = want_logprobs
        self._offset = 0

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}

    def _logprobs(self, delta: Delta) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        if self.kind == "chat":
            return chat_logprobs(delta.logprobs)
        out = completion_logprobs(delta.logprobs, self._offset)
        self._offset += sum(len(e.token) for e in delta.logprobs)
        return out

    def full(self, delta: Delta) -> dict[str, Any]:
        """The non-streaming response for the merged delta."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": delta.text},
                      "logprobs": self._logprobs(delta), "finish_reason": delta.finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage_json(delta.usage)}
        choice = {"index": 0, "text": delta.text, "logprobs": self._logprobs(delta),
                  "finish_reason": delta.finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage_json(delta.usage)}

    def chunk(self, delta: Delta, first: bool, include_usage: bool) -> dict[str, Any]:
        """One stream chunk; the first chat chunk also carries the assistant role."""
        if self.kind == "chat":
            content: dict[str, Any] = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
            choice = {"index": 0, "delta": content, "logprobs": self._logprobs(delta),
                      "finish_reason": delta.finish_reason}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": delta.text, "logprobs": self._logprobs(delta),
                      "finish_reason": delta.finish_reason}
            body = {**self._head("text_completion"), "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: Usage | None) -> dict[str, Any]:
        """The extra last chunk of ``stream_options.include_usage``: no choices, only usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage_json(usage)}
