"""Reading the JSON body of an HTTP request, before any field is looked at.

Owns the checks on the body as a whole: its size (413 above ``max_bytes``, from
the Content-Length header when given, else while reading), that it is JSON
(integers of at most 4300 digits; Python's NaN / Infinity literals are read as
floats, so the field's own check names them), how deeply it nests, and that every
string in it is valid Unicode (a lone surrogate such as ``"\\ud800"`` cannot be
tokenized or encoded). Raises ``RequestError`` (400 / 413).
"""
from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from pdserve.router.errors import RequestError, invalid

MAX_DEPTH = 32  # OpenAI bodies nest 5 levels deep (messages[i].content[j].text)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def too_large(max_bytes: int) -> RequestError:
    return RequestError(f"the request body is larger than this router's limit of {max_bytes} bytes "
                        "(--max-body-bytes)", 413, None, "request_too_large")


async def read_json(request: web.Request, max_bytes: int) -> Any:
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(max_bytes)
    try:
        raw = await request.read()  # aiohttp stops at the app's client_max_size (= max_bytes)
    except web.HTTPRequestEntityTooLarge:
        raise too_large(max_bytes) from None
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise invalid(f"the request body nests too deeply: at most {MAX_DEPTH} levels of arrays and objects") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    _check_tree(body, check_strings=_SURROGATE_ESCAPE.search(raw) is not None)
    return body


def _check_tree(body: Any, check_strings: bool) -> None:
    """Depth (iteratively: never recursion on client data) and, when escapes hint at them, lone surrogates."""
    if check_strings and isinstance(body, str):
        _check_string(body, "")
    stack: list[tuple[Any, str, int]] = [(body, "", 1)] if isinstance(body, (dict, list)) else []
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise invalid(f"the request body nests too deeply: at most {MAX_DEPTH} levels of arrays and objects",
                          path.lstrip(".") or None)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if check_strings and isinstance(key, str):
                _check_string(key, path, is_key=True)
            if isinstance(value, (dict, list)):
                stack.append((value, _child(path, key), depth + 1))
            elif check_strings and isinstance(value, str):
                _check_string(value, _child(path, key))


def _check_string(value: str, path: str, is_key: bool = False) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        param = path.lstrip(".") or None
        what = param or "the request body"
        what = f"a key of {what}" if is_key else what
        raise invalid(f"{what} is not valid Unicode: it has a lone surrogate "
                      f"{value[exc.start:exc.end].encode('unicode_escape').decode()} at position {exc.start}",
                      param) from None


def _child(path: str, key: Any) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"
