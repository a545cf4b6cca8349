"""The OpenAI-compatible HTTP API of the router (aiohttp).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or SSE with
``stream: true`` ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics``, ``GET /workers``.

Lifecycle of a request: parse + validate (400) -> prepare (tokenize, limits) ->
dispatch to a worker -> respond. The runner is built with handler cancellation, so
a client disconnect cancels the handler; the dispatcher's ``finally`` then cancels
the worker stream, which aborts the request there and frees its KV blocks.
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

from pdserve.router.errors import RequestError, invalid
from pdserve.router.openai_protocol import OpenAIRequest, parse_chat, parse_completion
from pdserve.router.openai_responses import ResponseBuilder
from pdserve.router.request_types import merge
from pdserve.router.service import RouterCore

log = logging.getLogger(__name__)


class HttpApi:
    def __init__(self, core: RouterCore) -> None:
        self._core = core

    def app(self) -> web.Application:
        app = web.Application(client_max_size=32 << 20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/workers", self.workers)
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        arrival, api = time.monotonic(), f"http_{kind}"
        try:
            body = await _json_body(request)
            parsed = parse_chat(body) if kind == "chat" else parse_completion(body)
            prefix = "chatcmpl" if kind == "chat" else "cmpl"
            rid = f"{prefix}-{uuid.uuid4().hex}"
            req, tokenizer = await self._core.prepare(rid, parsed.model, parsed.prompt, parsed.values, arrival,
                                                      parsed.default_max_tokens)
            builder = ResponseBuilder(kind, rid, req.model, int(time.time()), "logprobs" in parsed.values)
            with self._core.tracking(api):
                if parsed.stream:
                    return await self._stream(request, parsed, builder, req, tokenizer, api)
                async with contextlib.aclosing(self._core.dispatch(req, tokenizer)) as deltas:
                    final = merge([d async for d in deltas])
            self._core.metrics.observe_final(api, final)
            return web.json_response(builder.full(final))
        except RequestError as err:
            self._core.metrics.observe_error(api, err.code or str(err.status))
            return web.json_response(err.body(), status=err.status)
        except ConnectionError:
            raise  # the client went away; nothing to answer
        except Exception as exc:  # a bug must still answer in the API's error shape
            log.exception("request failed")
            self._core.metrics.observe_error(api, "internal")
            return web.json_response(RequestError(f"internal error: {exc}", 500).body(), status=500)

    async def _stream(self, request: web.Request, parsed: OpenAIRequest, builder: ResponseBuilder,
                      req: Any, tokenizer: Any, api: str) -> web.StreamResponse:
        async with contextlib.aclosing(self._core.dispatch(req, tokenizer)) as deltas:
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
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "pdserve",
                 "max_model_len": self._core.catalog.limits(m).max_model_len} for m in self._core.catalog.served()]
        return web.json_response({"object": "list", "data": data})

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


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None


async def _send(response: web.StreamResponse, body: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")
