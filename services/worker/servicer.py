"""The ``pdserve.v1.Worker`` gRPC service around one engine.

Lifecycle of one Generate stream: refused with UNAVAILABLE while draining ->
params validated (INVALID_ARGUMENT on ValueError) -> tracked in ``Inflight`` ->
outputs forwarded as they come (each engine yield may carry several tokens;
under load the engine batches more per yield) -> the last message has
``finish_reason`` -> untracked; along the way it feeds one ``RequestTrace`` (the
``pdserve:*`` request metrics) and, with tracing on, the request's ``generate`` span
(``common.tracing``; ended before the last message goes out, so it ends inside the
router's). When the client cancels, the handler is cancelled; closing the output
iterator and ``engine.abort()`` free the request's KV blocks.

On a decode-capable worker the outputs come from the ``DecodeCoordinator``
(remote prefill named by the router, else local). ``RemotePrefill`` /
``AbortRemotePrefill`` are served by the ``PrefillServer`` of a prefill-capable
worker; both are tracked in ``Inflight`` (as ``rp:<id>``) so a drain waits for them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from opentelemetry.trace import Span, SpanKind
from pdserve.v1 import worker_pb2, worker_pb2_grpc

from pdserve.cluster.orders import OrderRefused
from pdserve.cluster.wire import logprobs_to_proto, params_from_proto
from pdserve.common.tracing import Tracing, end_span
from pdserve.decode.coordinator import Origin, PrefillPeer
from pdserve.worker.metrics import WorkerMetrics
from pdserve.worker.remote_rpc import RemoteRoles, debug, order_from_proto, result_to_proto

log = logging.getLogger(__name__)


async def _nothing() -> None:
    return None


@dataclass
class Inflight:
    """Request ids with an open Generate stream; ``draining`` refuses new ones."""

    draining: bool = False
    ids: set[str] = field(default_factory=set)
    _empty: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, request_id: str) -> None:
        self.ids.add(request_id)
        self._empty.clear()

    def discard(self, request_id: str) -> None:
        self.ids.discard(request_id)
        if not self.ids:
            self._empty.set()

    async def wait_empty(self, timeout: float) -> bool:
        """True when every stream ended within ``timeout`` seconds."""
        if not self.ids:
            return True
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
            return True
        except TimeoutError:
            return False


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: Any, inflight: Inflight, metrics: WorkerMetrics, worker_id: str, role: str,
                 remote: RemoteRoles = RemoteRoles(),
                 on_adapters: Callable[[], Awaitable[None]] = _nothing, tracing: Tracing = Tracing()) -> None:
        self._engine = engine
        self._tracing = tracing
        self._on_adapters = on_adapters  # republishes the worker's record with its adapters
        self._inflight = inflight
        self._metrics = metrics
        self._worker_id = worker_id
        self._role = role
        self._remote = remote

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        rid = request.request_id
        if self._inflight.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self._worker_id} is draining")
        if not rid or rid in self._inflight.ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} is empty or already running")
        try:
            params = params_from_proto(request.params)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._inflight.add(rid)
        self._metrics.labelled(self._metrics.inflight).inc()
        if request.adapter:
            self._metrics.labelled(self._metrics.adapter_requests, adapter=request.adapter).inc()
        span = self._tracing.span("generate", self._tracing.extract(context.invocation_metadata()),
                                  lambda: self._span_attributes(request), kind=SpanKind.SERVER)
        try:
            async for message in self._stream(rid, list(request.prompt_token_ids), params, request, span):
                yield message
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RuntimeError as exc:  # the engine failed the request (a step raised)
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        finally:
            self._abort(rid)
            self._inflight.discard(rid)
            self._metrics.labelled(self._metrics.inflight).dec()

    def _outputs(self, rid: str, prompt: list[int], params: Any, request: worker_pb2.WorkerGenerateRequest,
                 span: Span) -> tuple[AsyncIterator[Any], Any]:
        """The output stream (remote or local prefill) and the origin it fills in."""
        decode = self._remote.decode
        if decode is None:
            if request.prefill_peers:
                log.warning("%s: this %s worker cannot receive KV; prefilling %s locally", self._worker_id,
                            self._role, rid)
            return self._engine.generate(rid, prompt, params, request.adapter or None), None
        origin = Origin()
        peers = [PrefillPeer(p.worker_id, p.grpc_address, p.kv_agent) for p in request.prefill_peers]
        return decode.generate(rid, prompt, params, peers, request.local_prefill_reason, origin,
                               request.adapter or None, span), origin

    def _abort(self, rid: str) -> None:
        if self._remote.decode is not None:
            self._remote.decode.abort(rid)
        self._engine.abort(rid)

    async def _stream(self, rid: str, prompt: list[int], params: Any, request: worker_pb2.WorkerGenerateRequest,
                      span: Span) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        start, first, finish = time.monotonic(), True, "abort"
        trace = self._metrics.serving.trace(start, len(prompt))
        outputs, origin = self._outputs(rid, prompt, params, request, span)
        try:
            async for out in outputs:
                now = time.monotonic()
                # NOTE: an engine that does not say when it scheduled the request has no queue/prefill split
                trace.output(now, len(out.new_token_ids), getattr(out, "scheduled_time", None))
                message = worker_pb2.WorkerGenerateResponse(
                    request_id=rid, token_ids=out.new_token_ids, finish_reason=out.finish_reason or "",
                    num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens)
                if out.logprobs:
                    message.logprobs.extend(logprobs_to_proto(out.logprobs))
                if first and out.new_token_ids:
                    first = False
                    message.first_token_seconds = now - start
                    message.prefill_worker_id = origin.prefill_worker_id if origin is not None else ""
                    self._count_prompt(out, message.first_token_seconds)
                    self._trace_first_token(span, start, now, getattr(out, "scheduled_time", None), origin)
                self._metrics.labelled(self._metrics.generated_tokens).inc(len(out.new_token_ids))
                if out.finish_reason:
                    finish = trace.finish_reason = out.finish_reason
                    end_span(span, attributes=lambda: {"pdserve.finish_reason": finish})  # before the caller's end
                yield message
        except ValueError as exc:
            trace.refused = True
            end_span(span, str(exc))
            raise
        except RuntimeError as exc:
            trace.finish_reason = "error"
            end_span(span, str(exc))
            raise
        finally:
            end_span(span, attributes=lambda: {"pdserve.finish_reason": finish})
            self._metrics.labelled(self._metrics.requests, finish_reason=finish).inc()
            trace.close(time.monotonic())
            with contextlib.suppress(Exception):
                await outputs.aclose()

    def _span_attributes(self, request: worker_pb2.WorkerGenerateRequest) -> dict[str, Any]:
        return {"pdserve.request_id": request.request_id, "pdserve.worker_id": self._worker_id,
                "pdserve.role": self._role, "pdserve.prompt_tokens": len(request.prompt_token_ids),
                "pdserve.adapter": request.adapter}

    def _trace_first_token(self, span: Span, start: float, now: float, scheduled: float | None, origin: Any) -> None:
        """The first_token event and the parts before it: ``queue`` (until first scheduled),
        then ``prefill`` when the prompt was computed here."""
        if not span.is_recording():
            return
        prefill_worker = origin.prefill_worker_id if origin is not None else ""
        span.set_attribute("pdserve.prefill_worker", prefill_worker)
        span.add_event("first_token")
        if scheduled is not None:
            self._tracing.record("queue", span, start, scheduled)
            if not prefill_worker:
                self._tracing.record("prefill", span, scheduled, now, lambda: {"pdserve.prefill_location": "local"})

    def _count_prompt(self, out: Any, first_token_seconds: float) -> None:
        self._metrics.labelled(self._metrics.prompt_tokens).inc(out.num_prompt_tokens)
        self._metrics.labelled(self._metrics.cached_tokens).inc(out.num_cached_tokens)
        self._metrics.labelled(self._metrics.first_token).observe(first_token_seconds)

    # ---- LoRA adapters -----------------------------------------------------------------
    async def LoadAdapter(self, request: worker_pb2.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> worker_pb2.AdapterResponse:
        try:
            await self._engine.load_adapter(request.name, request.path)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await self._on_adapters()
        return worker_pb2.AdapterResponse(adapters=self._engine.adapters())

    async def UnloadAdapter(self, request: worker_pb2.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> worker_pb2.AdapterResponse:
        try:
            await self._engine.unload_adapter(request.name)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        await self._on_adapters()
        return worker_pb2.AdapterResponse(adapters=self._engine.adapters())

    async def Abort(self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext) -> worker_pb2.AbortResponse:
        found = request.request_id in self._inflight.ids
        self._abort(request.request_id)
        return worker_pb2.AbortResponse(found=found)

    # ---- disaggregation -------------------------------------------------------------
    async def RemotePrefill(self, request: worker_pb2.RemotePrefillRequest,
                            context: grpc.aio.ServicerContext) -> worker_pb2.RemotePrefillResponse:
        prefill, key = self._remote.prefill, f"rp:{request.request_id}"
        if prefill is None:
            return worker_pb2.RemotePrefillResponse(
                status=worker_pb2.RemotePrefillResponse.FAILED,
                error=f"worker {self._worker_id} ({self._role}) does not serve remote prefills")
        try:
            if self._remote.orders is not None:
                self._remote.orders.check(request)
            order = order_from_proto(request)
        except OrderRefused as exc:
            log.warning("refused a RemotePrefill order %r for KV agent %r from %s: %s", request.request_id[:64],
                        request.decode_kv_agent[:64], context.peer(), exc)
            return worker_pb2.RemotePrefillResponse(status=worker_pb2.RemotePrefillResponse.INVALID,
                                                    error=f"order refused: {exc}")
        except ValueError as exc:
            return worker_pb2.RemotePrefillResponse(status=worker_pb2.RemotePrefillResponse.INVALID, error=str(exc))
        self._inflight.add(key)
        try:
            parent = self._tracing.extract(context.invocation_metadata())
            return result_to_proto(await prefill.remote_prefill(order, parent))
        finally:
            self._inflight.discard(key)

    async def AbortRemotePrefill(self, request: worker_pb2.AbortRemotePrefillRequest,
                                 context: grpc.aio.ServicerContext) -> worker_pb2.AbortRemotePrefillResponse:
        if self._remote.prefill is None:
            return worker_pb2.AbortRemotePrefillResponse(found=False, quiesced=True)
        found, quiesced = await self._remote.prefill.abort(request.request_id, self._remote.abort_timeout)
        return worker_pb2.AbortRemotePrefillResponse(found=found, quiesced=quiesced)

    async def Debug(self, request: worker_pb2.DebugRequest,
                    context: grpc.aio.ServicerContext) -> worker_pb2.DebugResponse:
        if not self._remote.debug:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "debug RPCs are off (start with --debug-rpcs true)")
        return await debug(self._engine, self._remote, request)

    async def Stats(self, request: worker_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> worker_pb2.StatsResponse:
        s = self._engine.stats()
        return worker_pb2.StatsResponse(
            worker_id=self._worker_id, role=self._role, draining=self._inflight.draining,
            running=s["running"], waiting=s["waiting"], kv_blocks_free=s["kv_blocks_free"],
            kv_blocks_used=s["kv_blocks_used"], kv_blocks_cached=s["kv_blocks_cached"],
            kv_blocks_total=s["kv_blocks_total"], tokens_computed_total=s["tokens_computed_total"],
            steps_total=s["steps_total"], last_step_seconds=s["last_step_seconds"],
            inflight_streams=len([i for i in self._inflight.ids if not i.startswith("rp:")]),
            **self._remote.stats())
