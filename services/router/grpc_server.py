"""The ``pdserve.v1.Router`` gRPC service: Generate (server streaming), ListWorkers, Health.

Lifecycle of a Generate call: (``grpc_guard``: API key, request bytes) -> validate
+ tokenize (INVALID_ARGUMENT; the same rules as HTTP, ``validation``) -> dispatch
(UNAVAILABLE when no worker) -> stream deltas (``stream=false``: one merged
message). A client cancel cancels this handler; the dispatcher's ``finally``
cancels the worker stream, which aborts the request on the worker. A bug answers
INTERNAL with its message, never grpc's bare UNKNOWN.
"""
from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import AsyncIterator

import grpc
from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc

from pdserve.cluster.wire import params_values_from_proto
from pdserve.router.errors import RequestError, invalid
from pdserve.router.request_types import Delta, Prompt, merge
from pdserve.router.service import RouterCore
from pdserve.router.validation import check_messages

log = logging.getLogger(__name__)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, core: RouterCore) -> None:
        self._core = core

    async def Generate(self, request: router_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.GenerateResponse]:
        arrival = time.monotonic()
        rid = request.request_id or f"gen-{uuid.uuid4().hex}"
        try:
            prompt = _prompt(request)
            req, tokenizer = await self._core.prepare(
                f"{rid}-{uuid.uuid4().hex[:8]}", request.model or None, prompt,
                params_values_from_proto(request.params), arrival, None if prompt.messages is not None else 16)
            with self._core.tracking("grpc"):
                async with contextlib.aclosing(self._core.dispatch(req, tokenizer,
                                                                   context.invocation_metadata())) as deltas:
                    if request.stream:
                        async for delta in deltas:
                            self._observe(delta)
                            yield _response(rid, delta)
                    else:
                        final = merge([d async for d in deltas])
                        self._observe(final)
                        yield _response(rid, final)
        except RequestError as err:
            self._core.metrics.observe_error("grpc", err.code or str(err.status))
            await context.abort(err.grpc_code, err.message)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Exception as exc:  # a bug must still answer with a status that says so
            log.exception("request failed")
            self._core.metrics.observe_error("grpc", "internal")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")

    def _observe(self, delta: Delta) -> None:
        if delta.finish_reason is not None:
            self._core.metrics.observe_final("grpc", delta)

    async def ListWorkers(self, request: router_pb2.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> router_pb2.ListWorkersResponse:
        workers = [router_pb2.WorkerInfo(id=w["id"], role=w["role"], grpc_address=w["grpc_address"],
                                         metrics_url=w["metrics_url"], model=w["model"],
                                         load=router_pb2.WorkerLoad(**w["load"]), quantization=w["quantization"] or "")
                   for w in self._core.workers_json()]
        return router_pb2.ListWorkersResponse(workers=workers)

    async def LoadLoraAdapter(self, request: router_pb2.LoadLoraAdapterRequest,
                              context: grpc.aio.ServicerContext) -> router_pb2.LoraAdapterResponse:
        if not request.lora_name.strip() or not request.lora_path.strip():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "lora_name and lora_path are required")
        try:
            result = await self._core.adapters.load(request.lora_name, request.lora_path, request.model or None)
        except RequestError as err:
            await context.abort(err.grpc_code, err.message)
        return router_pb2.LoraAdapterResponse(lora_name=request.lora_name, workers=result["workers"])

    async def UnloadLoraAdapter(self, request: router_pb2.UnloadLoraAdapterRequest,
                                context: grpc.aio.ServicerContext) -> router_pb2.LoraAdapterResponse:
        if not request.lora_name.strip():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "lora_name is required")
        try:
            result = await self._core.adapters.unload(request.lora_name)
        except RequestError as err:
            await context.abort(err.grpc_code, err.message)
        return router_pb2.LoraAdapterResponse(lora_name=request.lora_name, workers=result["workers"])

    async def Health(self, request: router_pb2.HealthRequest,
                     context: grpc.aio.ServicerContext) -> router_pb2.HealthResponse:
        status, workers, problems = self._core.health()
        detail = "; ".join(f"model {m!r}: {why}" for m, why in sorted(problems.items()))
        return router_pb2.HealthResponse(status=status, num_workers=workers, detail=detail)


def _prompt(request: router_pb2.GenerateRequest) -> Prompt:
    which = request.WhichOneof("prompt")
    if which == "text":
        return Prompt(text=request.text)
    if which == "chat":
        if not request.chat.messages:
            raise invalid("chat.messages must not be empty", "chat")
        return Prompt(messages=check_messages([{"role": m.role, "content": m.content}
                                               for m in request.chat.messages]))
    if which == "token_ids":
        return Prompt(token_ids=list(request.token_ids.ids))
    raise invalid("one of text, chat or token_ids is required", "prompt")


def _response(rid: str, delta: Delta) -> router_pb2.GenerateResponse:
    msg = router_pb2.GenerateResponse(request_id=rid, token_ids=delta.token_ids, text=delta.text,
                                      finish_reason=delta.finish_reason or "", worker_id=delta.worker_id,
                                      prefill_worker_id=delta.prefill_worker_id)
    for e in delta.logprobs:
        msg.logprobs.append(common_pb2.TokenLogprob(
            token_id=e.token_id, logprob=e.logprob, token=e.token,
            top=[common_pb2.TopLogprob(token_id=t.token_id, logprob=t.logprob, token=t.token) for t in e.top]))
    if delta.usage is not None:
        u = delta.usage
        msg.usage.CopyFrom(common_pb2.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                            cached_tokens=u.cached_tokens, total_tokens=u.total_tokens))
    if delta.timing is not None:
        t = delta.timing
        msg.timing.CopyFrom(router_pb2.Timing(time_to_first_token_seconds=t.time_to_first_token,
                                              queue_seconds=t.queue, worker_first_token_seconds=t.worker_first_token,
                                              total_seconds=t.total))
    return msg
