"""The OpenAI-compatible HTTP API of the router (aiohttp).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or SSE with
``stream: true`` ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics``, ``GET /workers``, ``GET /openapi.json`` (``openapi``).

Lifecycle of a request: API key (401, ``auth``) -> read the body (413 / 400,
``request_body``) -> parse + validate (400) -> prepare (tokenize, limits) ->
dispatch to a worker -> respond. Every error, aiohttp's own (404, 405) included,
is answered in OpenAI's error shape. The runner is built with handler
cancellation, so a client disconnect cancels the handler; the dispatcher's
``finally`` then cancels the worker stream, which aborts the request there and
frees its KV blocks.
NOTE: for streams, headers are sent only with the first delta, so "no worker"
and worker-side validation errors are still plain HTTP errors.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from pdserve.router.auth import ApiKey, unauthorized
from pdserve.router.errors import RequestError, invalid
from pdserve.router.openai_protocol import OpenAIRequest, parse_chat, parse_completion
from pdserve.router.openai_responses import ResponseBuilder
from pdserve.router.openapi import openapi_document
from pdserve.router.request_body import read_json
from pdserve.router.request_types import merge
from pdserve.router.service import RouterCore

log = logging.getLogger(__name__)


class HttpApi:
    def __init__(self, core: RouterCore, api_key: ApiKey = ApiKey(), max_body_bytes: int = 8 << 20) -> None:
        self._core = core
        self._api_key = api_key
        self._max_body_bytes = max_body_bytes

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[self._guard])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load_lora_adapter)
        app.router.add_post("/v1/unload_lora_adapter", self.unload_lora_adapter)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/workers", self.workers)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The API key on protected paths, and OpenAI's error shape for aiohttp's own errors."""
        authorization = request.headers.get("Authorization")
        if self._api_key.protects(_route_path(request)) and not self._api_key.allows(authorization):
            return _error(unauthorized(authorization), {"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {k: v for k, v in exc.headers.items() if k in ("Allow",)}
            return _error(RequestError(f"{exc.reason}: {request.method} {request.path}", exc.status), headers)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        arrival, api = time.monotonic(), f"http_{kind}"
        try:
            body = await read_json(request, self._max_body_bytes)
            parsed = parse_chat(body) if kind == "chat" else parse_completion(body)
            prefix = "chatcmpl" if kind == "chat" else "cmpl"
            rid = f"{prefix}-{uuid.uuid4().hex}"
            req, tokenizer = await self._core.prepare(rid, parsed.model, parsed.prompt, parsed.values, arrival,
                                                      parsed.default_max_tokens)
            builder = ResponseBuilder(kind, rid, req.served_name, int(time.time()), "logprobs" in parsed.values)
            with self._core.tracking(api):
                if parsed.stream:
                    return await self._stream(request, parsed, builder, req, tokenizer, api)
                async with contextlib.aclosing(self._core.dispatch(req, tokenizer, request.headers)) as deltas:
                    final = merge([d async for d in deltas])
            self._core.metrics.observe_final(api, final)
            return web.json_response(builder.full(final))
        except RequestError as err:
            self._core.metrics.observe_error(api, err.code or str(err.status))
            return _error(err)
        except ConnectionError:
            raise  # the client went away; nothing to answer
        except Exception as exc:  # a bug must still answer in the API's error shape
            log.exception("request failed")
            self._core.metrics.observe_error(api, "internal")
            return web.json_response(RequestError(f"internal error: {exc}", 500).body(), status=500)

    async def _stream(self, request: web.Request, parsed: OpenAIRequest, builder: ResponseBuilder,
                      req: Any, tokenizer: Any, api: str) -> web.StreamResponse:
        async with contextlib.aclosing(self._core.dispatch(req, tokenizer, request.headers)) as deltas:
            first = await anext(deltas)  # errors before any output are plain HTTP errors
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            delta, is_first = first, True
            try:
                while True:
                    await _send(response, builder.chunk(delta, is_first, parsed.include_usage))
                    if delta.finish_reason is not None:
                        self._core.metrics.observe_final(api, delta)
                        if parsed.include_usage:
                            await _send(response, builder.usage_chunk(delta.usage))
                        break
                    delta, is_first = await anext(deltas), False
            except RequestError as err:
                self._core.metrics.observe_error(api, err.code or str(err.status))
                await _send(response, err.body())
            except StopAsyncIteration:
                await _send(response, RequestError("the stream ended early", 502).body())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response

    async def models(self, _: web.Request) -> web.Response:
        catalog = self._core.catalog
        def card(name: str, base: str | None) -> dict[str, Any]:
            limits = catalog.limits(base or name)
            return {"id": name, "object": "model", "created": 0, "owned_by": "pdserve", "root": name, "parent": base,
                    "max_model_len": limits.max_model_len, "quantization": limits.quantization}

        data = [card(m, None) for m in catalog.served()]
        data += [card(name, base) for name, base in sorted(catalog.adapters().items())]
        return web.json_response({"object": "list", "data": data})

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        """``{"lora_name", "lora_path"[, "model"]}``: load on every worker of the model."""
        try:
            body = _adapter_body(await read_json(request, self._max_body_bytes), ("lora_name", "lora_path"),
                                 ("model",))
            return web.json_response(await self._core.adapters.load(body["lora_name"], body["lora_path"],
                                                                    body.get("model")))
        except RequestError as exc:
            return _error(exc)

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        """``{"lora_name"}``: unload everywhere; requests in flight finish with it."""
        try:
            body = _adapter_body(await read_json(request, self._max_body_bytes), ("lora_name",),
                                 ("lora_path", "lora_int_id"))
            return web.json_response(await self._core.adapters.unload(body["lora_name"]))
        except RequestError as exc:
            return _error(exc)

    async def health(self, _: web.Request) -> web.Response:
        """Readiness: 200 while every served model can be served, 503 naming each cause otherwise."""
        status, workers, problems = self._core.health()
        if problems:
            return web.json_response({"status": "unhealthy", "workers": workers, "problems": problems}, status=503)
        return web.json_response({"status": "ok", "workers": workers})

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self._core.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def workers(self, _: web.Request) -> web.Response:
        return web.json_response(self._core.workers_json())

    async def openapi(self, _: web.Request) -> web.Response:
        return web.json_response(openapi_document(self._core.max_tokens, self._max_body_bytes, self._api_key.enabled,
                                                  self._api_key.protect_metrics, self._core.catalog.served()))


def _adapter_body(body: Any, required: tuple[str, ...], optional: tuple[str, ...]) -> dict[str, Any]:
    """A load/unload body: the required non-empty strings, nothing unknown (400 naming the field)."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise invalid(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0], "unknown_parameter")
    for name in required:
        if not isinstance(body.get(name), str) or not body[name].strip():
            raise invalid(f"{name} is required and must be a non-empty string", name, "missing_required_parameter")
    for name in optional:
        kind = int if name == "lora_int_id" else str
        value = body.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise invalid(f"{name} must be {'an integer' if kind is int else 'a string'}", name, "invalid_type")
    return body


def _route_path(request: web.Request) -> str:
    """The path of the route aiohttp matched (what auth protects), else the request's path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


def _error(err: RequestError, headers: dict[str, str] | None = None) -> web.Response:
    if err.status == 429:
        headers = {**(headers or {}), "Retry-After": "1"}
    return web.json_response(err.body(), status=err.status, headers=headers)


async def _send(response: web.StreamResponse, body: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")
