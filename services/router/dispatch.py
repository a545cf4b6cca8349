"""Running one prepared request on a worker and turning its token stream into deltas.

Lifecycle of a request here: pick a route (a decode or hybrid worker, and the
prefill workers it may ask; see ``worker_pool``) -> open the decode worker's
Generate stream naming them -> for each message: detokenize incrementally, match
stop strings, convert logprobs, yield a ``Delta`` -> the final delta carries
finish_reason, usage and timing. The decode worker runs the P/D handoff itself
(reservation, RemotePrefill, retry on the next prefill worker, local fallback).

NOTE: the worker stream is always cancelled in ``finally``: on a stop-string match,
on client disconnect or gRPC cancel (this generator is closed / cancelled), and
on errors. Cancelling the stream aborts the request on the worker, which frees
its KV blocks. A worker that fails before anything was sent to the client
(dead, draining) is marked suspect and the request is retried on another one.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator

import grpc
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind
from pdserve.v1 import worker_pb2

from pdserve.cluster.wire import params_to_proto
from pdserve.common.detokenizer import IncrementalDetokenizer
from pdserve.common.tracing import Carrier, Tracing, add_event, end_span, set_attributes
from pdserve.router.errors import RequestError, invalid, unavailable
from pdserve.router.request_types import Delta, GenerationRequest, TokenLogprob, TopToken, Timing, Usage
from pdserve.router.worker_pool import Route, WorkerHandle, WorkerPool


class _Retry(Exception):
    """The worker failed before any output reached the client; try another."""


class _StreamState:
    """Text, counters and timing of one request while it streams from one worker."""

    def __init__(self, req: GenerationRequest, tokenizer: Any, worker_id: str, span: Span = INVALID_SPAN) -> None:
        p = req.params
        self.req, self.tokenizer, self.worker_id, self.span = req, tokenizer, worker_id, span
        self.detok = (IncrementalDetokenizer(tokenizer, req.prompt_token_ids, p.stop, p.include_stop_str_in_output,
                                             p.min_tokens)
                      if tokenizer is not None else None)
        self.dispatched = time.monotonic()
        self.first_token: float | None = None
        self.worker_first_token = 0.0
        self.completion_tokens = 0
        self.prompt_tokens, self.cached_tokens = len(req.prompt_token_ids), 0
        self.prefill_worker_id = ""
        self.finished = False

    def on_message(self, msg: worker_pb2.WorkerGenerateResponse) -> Delta | None:
        tokens = list(msg.token_ids)
        self.prompt_tokens = msg.num_prompt_tokens or self.prompt_tokens
        self.cached_tokens = max(self.cached_tokens, msg.num_cached_tokens)
        if tokens and self.first_token is None:
            self.first_token = time.monotonic()
            self.worker_first_token = msg.first_token_seconds
            self.prefill_worker_id = msg.prefill_worker_id
            add_event(self.span, "first_token", lambda: {"pdserve.prefill_worker": self.prefill_worker_id})
        self.completion_tokens += len(tokens)
        text, stopped = self.detok.add(tokens) if self.detok is not None else ("", False)
        finish = "stop" if stopped else (msg.finish_reason or None)
        if not tokens and finish is None:
            return None
        delta = Delta(text=text, token_ids=tokens, logprobs=self._logprobs(msg), worker_id=self.worker_id,
                      prefill_worker_id=self.prefill_worker_id)
        if finish is not None:
            self.finished = True
            delta.text += self.detok.flush() if self.detok is not None else ""
            delta.finish_reason, delta.usage, delta.timing = finish, self._usage(), self._timing()
            set_attributes(self.span, lambda: {"pdserve.finish_reason": finish,
                                               "pdserve.completion_tokens": self.completion_tokens,
                                               "pdserve.cached_tokens": self.cached_tokens})
        return delta

    def _usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def _timing(self) -> Timing:
        now, arrival = time.monotonic(), self.req.arrival
        return Timing(time_to_first_token=(self.first_token or now) - arrival, queue=self.dispatched - arrival,
                      worker_first_token=self.worker_first_token, total=now - arrival)

    def _logprobs(self, msg: worker_pb2.WorkerGenerateResponse) -> list[TokenLogprob]:
        return [TokenLogprob(e.token_id, self._text(e.token_id), e.logprob,
                             [TopToken(t.token_id, self._text(t.token_id), t.logprob) for t in e.top])
                for e in msg.logprobs]

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer is not None else ""


class Dispatcher:
    def __init__(self, pool: WorkerPool, retry_attempts: int = 3, tracing: Tracing = Tracing()) -> None:
        self._pool = pool
        self._attempts = retry_attempts
        self._tracing = tracing

    def stream(self, req: GenerationRequest, tokenizer: Any, carrier: Carrier | None = None) -> AsyncIterator[Delta]:
        """Deltas of ``req`` from a worker chosen by the policy; raises RequestError. ``carrier``:
        the client's headers or metadata, whose trace context (if any) the request's span continues."""
        if not self._tracing.enabled:
            return self._stream(req, tokenizer, INVALID_SPAN)
        return self._traced(req, tokenizer, carrier)

    async def _traced(self, req: GenerationRequest, tokenizer: Any, carrier: Carrier | None) -> AsyncIterator[Delta]:
        """``_stream`` inside the request's span (router ``generate``), from its arrival to its end."""
        span = self._tracing.span("generate", self._tracing.extract(carrier), lambda: _request_attributes(req),
                                  req.arrival, SpanKind.SERVER)
        try:
            async with contextlib.aclosing(self._stream(req, tokenizer, span)) as deltas:
                async for delta in deltas:
                    yield delta
        except Exception as exc:
            end_span(span, str(exc) or type(exc).__name__)
            raise
        finally:
            end_span(span)

    async def _stream(self, req: GenerationRequest, tokenizer: Any, span: Span) -> AsyncIterator[Delta]:
        tried: list[str] = []
        for _ in range(self._attempts):
            route = self._pool.pick_route(req.prompt_token_ids, req.model, exclude=tried, adapter=req.adapter)
            if route is None:
                break
            handle = route.decode
            tried.append(handle.record.id)
            set_attributes(span, lambda: _route_attributes(route, len(tried)))
            try:
                async with contextlib.aclosing(self._run_on(route, req, tokenizer, span)) as deltas:
                    async for delta in deltas:
                        yield delta
                return
            except _Retry as exc:
                error = str(exc)
                add_event(span, "retry", lambda: {"pdserve.decode_worker": handle.record.id, "pdserve.error": error})
                self._pool.mark_suspect(handle.record.id)
        if tried:
            raise unavailable(f"workers {tried} could not take the request; try again", "workers_failed")
        if self._pool.candidates("prefill", req.model, adapter=req.adapter):
            raise unavailable(f"no decode or hybrid worker serves model {req.served_name!r} (prefill workers only "
                              "compute prompts for decode workers)", "no_decode_workers")
        raise unavailable(f"no live worker serves model {req.served_name!r}")

    async def _run_on(self, route: Route, req: GenerationRequest, tokenizer: Any, span: Span) -> AsyncIterator[Delta]:
        handle = route.decode
        state = _StreamState(req, tokenizer, handle.record.id, span)
        message = worker_pb2.WorkerGenerateRequest(
            request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
            params=params_to_proto(req.params, with_stop_strings=False), local_prefill_reason=route.local_reason,
            adapter=req.adapter or "",
            prefill_peers=[worker_pb2.PrefillPeer(worker_id=r.id, grpc_address=r.grpc_address, kv_agent=r.kv_agent)
                           for r in route.prefill])
        call = handle.stub.Generate(message, metadata=self._tracing.inject(span))
        sent_any = False
        with self._pool.track(handle.record.id):
            try:
                async for msg in call:
                    delta = state.on_message(msg)
                    if delta is not None:
                        sent_any = True
                        yield delta
                    if state.finished:
                        return
            except grpc.aio.AioRpcError as exc:
                raise _map_error(exc, handle, sent_any) from None
            finally:
                call.cancel()  # no-op when finished; otherwise aborts the request on the worker
        raise RequestError(f"worker {handle.record.id} ended the stream without a finish reason", 502, None,
                           "worker_failed")


def _request_attributes(req: GenerationRequest) -> dict[str, Any]:
    return {"pdserve.request_id": req.request_id, "pdserve.model": req.model, "pdserve.adapter": req.adapter or "",
            "pdserve.prompt_tokens": len(req.prompt_token_ids), "pdserve.max_tokens": req.params.max_tokens or 0}


def _route_attributes(route: Route, attempt: int) -> dict[str, Any]:
    return {"pdserve.decode_worker": route.decode.record.id, "pdserve.prefill_workers": [r.id for r in route.prefill],
            "pdserve.local_prefill_reason": route.local_reason, "pdserve.attempts": attempt}


def _map_error(exc: grpc.aio.AioRpcError, handle: WorkerHandle, sent_any: bool) -> Exception:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return invalid(details)
    if code == grpc.StatusCode.UNAVAILABLE and not sent_any:
        return _Retry(details)
    return RequestError(f"worker {handle.record.id} failed: {code.name}: {details}", 503, None, "worker_failed")
