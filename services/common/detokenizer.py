"""Incremental detokenization with stop strings, for one request's output.

Owns: the text state of one generating request (token ids seen so far, the text
emitted, the text held back). Lifecycle: created when the request starts,
``add()`` after each batch of new tokens, ``flush()`` once when it finishes.

With ``min_tokens`` a stop string counts only if it ends in the text of the
``min_tokens``-th token or later (as EOS and stop_token_ids cannot come before).

Text is decoded from a sliding window of tokens (prefix/read offsets) so that
multi-token characters and tokenizer-specific spacing come out exactly as a full
decode would; incomplete UTF-8 (U+FFFD at the end) waits for the next token.
"""
from __future__ import annotations

from typing import Protocol

class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: _Decoder, prompt_token_ids: list[int] | None = None,
                 stop: tuple[str, ...] = (), include_stop_str_in_output: bool = False, min_tokens: int = 0):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""  # all text decoded so far (truncated at a stop string)
        self._emitted = 0  # how much of self.text has been returned
        self._min_tokens = min_tokens
        self._stop_floor = 0 if min_tokens == 0 else -1  # a stop string must end past this text length
        self.stopped = False

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def add(self, new_token_ids: list[int]) -> tuple[str, bool]:
        """Append tokens; return (text delta safe to emit now, whether a stop string matched)."""
        if self.stopped:
            return "", True
        before = len(self.text)
        for token_id in new_token_ids:
            if len(self._ids) + 1 == self._min_tokens:
                self._stop_floor = len(self.text)  # NOTE: the min_tokens-th token may end a stop string
            self._ids.append(token_id)
            self.text += self._decode_step()
        if self._stop and self._stop_floor >= 0 and self._find_stop(before):
            self.stopped = True
            return self._take(len(self.text)), True
        return self._take(max(self._emitted, len(self.text) - self._hold)), False

    def flush(self) -> str:
        """The rest of the text, at the end of the request."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        delta = self.text[self._emitted:upto]
        self._emitted = max(self._emitted, upto)
        return delta

    def _decode_step(self) -> str:
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        full_text = self._tok.decode(self._ids[self._prefix:])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        new_text = full_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        return new_text

    def _find_stop(self, before: int) -> bool:
        start = max(0, before - max(len(s) for s in self._stop) + 1)
        best = -1
        best_stop = ""
        for s in self._stop:
            idx = self.text.find(s, max(start, self._stop_floor - len(s) + 1))
            if idx != -1 and (best == -1 or idx < best):
                best, best_stop = idx, s
        if best == -1:
            return False
        self.text = self.text[: best + (len(best_stop) if self._include_stop else 0)]
        self._emitted = min(self._emitted, len(self.text))
        return True
