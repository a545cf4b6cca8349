"""Request errors of the router and their two renderings: HTTP (OpenAI's error shape)
and gRPC status codes. Raised anywhere before or during a request; the API layers
turn them into responses, so validation code never knows which API it serves.
"""
from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

import grpc

_GRPC = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
         429: grpc.StatusCode.RESOURCE_EXHAUSTED,
         502: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE, 500: grpc.StatusCode.INTERNAL,
         504: grpc.StatusCode.DEADLINE_EXCEEDED}
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error",
          502: "worker_error", 500: "internal_error", 504: "timeout_error"}


class _Short(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 80, 80, 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 8


@dataclass
class RequestError(Exception):
    message: str
    status: int = 400
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _GRPC.get(self.status, grpc.StatusCode.UNKNOWN)

    def body(self) -> dict[str, Any]:
        """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> RequestError:
    return RequestError(message, 400, param, code)


def shown(value: Any) -> str:
    """A client's value for an error message: its repr, short (never the whole of a huge or deep value)."""
    return _Short().repr(value)


def unavailable(message: str, code: str = "no_workers") -> RequestError:
    return RequestError(message, 503, None, code)


def from_value_error(exc: ValueError, param: str | None = None) -> RequestError:
    """A SamplingParams / tokenizer ValueError; its first word usually names the field."""
    text = str(exc)
    first = text.split(" ", 1)[0]
    return invalid(text, param or (first if first.isidentifier() else None))
