"""The request rules the HTTP and gRPC APIs share, so a request gets the same answer
(and the same message) on either API.

Owns: the allowed chat roles, the bounds of every number a client may send and the
checks built on them. Every integer is bounded by its type on the wire to the
workers (``proto/pdserve/v1/common.proto``, ``worker.proto``: int32 / int64) and by
what ``SamplingParams`` accepts; every float must be finite and keep its meaning as
the wire's float32. Raises ``RequestError`` (400) naming the field and the range.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Iterable

from pdserve.router.errors import invalid, shown

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.401298464324817e-45  # the smallest positive float32: (0, x] starts here on the wire
MAX_LOGPROBS = 20

# OpenAI's "developer" is the newer name of "system".
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class Bound:
    """A closed range [low, high], or (low, high] when ``low_open``."""

    low: float
    high: float
    low_open: bool = False

    def contains(self, value: float) -> bool:
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}]"


# SamplingParams fields the router forwards, with their wire types in comments.
INT_BOUNDS: dict[str, Bound] = {
    "max_tokens": Bound(1, INT32_MAX),       # int32
    "min_tokens": Bound(0, INT32_MAX),       # int32
    "top_k": Bound(-1, INT32_MAX),           # int32; 0 is refused by SamplingParams (-1 = disabled)
    "seed": Bound(0, INT64_MAX),             # int64
    "logprobs": Bound(0, MAX_LOGPROBS),      # int32
    "stop_token_ids": Bound(0, INT32_MAX),   # repeated int32, each
}
FLOAT_BOUNDS: dict[str, Bound] = {           # all float32 on the wire
    "temperature": Bound(0.0, FLOAT32_MAX),
    "top_p": Bound(0.0, 1.0, low_open=True),
    "min_p": Bound(0.0, 1.0),
    "repetition_penalty": Bound(0.0, FLOAT32_MAX, low_open=True),
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
}
TOKEN_ID = Bound(0, INT32_MAX)  # prompt token ids: repeated int32 to the workers
MAX_STOP_STRINGS = 16


def check_int(name: str, value: Any, bound: Bound) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not bound.contains(value):
        raise invalid(f"{name} must be an integer in {bound}, got {shown(value)}", name)
    return value


def check_float(name: str, value: Any, bound: Bound) -> float:
    """A finite number in ``bound`` that stays in it as float32 (1e-50 is 0.0 on the wire)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{name} must be a number in {bound}, got {shown(value)}", name, "invalid_type")
    if not math.isfinite(value) or not bound.contains(value):
        raise invalid(f"{name} must be a finite number in {bound}, got {shown(value)}", name)
    if not bound.contains(_float32(value)):
        raise invalid(f"{name} must be a number in {bound}, got {shown(value)} (which is {_float32(value)} as the "
                      "wire's float32)", name)
    return value


def check_values(values: dict[str, Any]) -> None:
    """Every sampling value the client set (``SamplingParams`` keyword arguments)."""
    for name, bound in INT_BOUNDS.items():
        value = values.get(name)
        if value is not None and name != "stop_token_ids":
            check_int(name, value, bound)
    for name, bound in FLOAT_BOUNDS.items():
        if values.get(name) is not None:
            check_float(name, values[name], bound)
    for token in values.get("stop_token_ids") or ():
        check_int("stop_token_ids", token, INT_BOUNDS["stop_token_ids"])
    stop = values.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS:
        raise invalid(f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")


def check_token_ids(ids: Iterable[Any], name: str = "prompt") -> None:
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not TOKEN_ID.contains(t)]
    if bad:
        raise invalid(f"{name} token ids must be integers in {TOKEN_ID}, got {shown(bad[:5])}", name)


def check_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Chat messages ({"role", "content"} strings) with supported roles; "developer" becomes "system"."""
    if not messages:
        raise invalid("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise invalid(f"messages[{i}].role {shown(m['role'])} is not supported: expected one of "
                          f"{', '.join(ROLES)}", f"messages[{i}].role")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]})
    return out


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**64 else f"{value:.8g}"
