"""Decode side of disaggregation: get a prompt's KV from a prefill worker, then decode it here.

Owns: the decode-side life of each request until its KV has landed (attempts,
reservations, the RemotePrefill calls), the releases of reservations that must
wait for a prefill worker (quarantine tasks), the gRPC channels to prefill
workers, and the choice between remote and local prefill (conditional
disaggregation, counted with a reason).

Request state machine (``generate``):

    START --(no prefill peer / prompt below threshold)------------------> LOCAL
      |
    RESERVING  engine.reserve_remote(attempt id) -- pool full ----------> LOCAL
      |        uncached part below threshold: cancel_remote ------------> LOCAL
    REQUESTING RemotePrefill(peer i) + wait for the NIXL notification
      |  notification {rid, first token} ----------------------------> ADMITTED
      |  answer DONE, notification within notify_timeout -------------> ADMITTED
      |  other answer (prefill confirmed it holds nothing): cancel_remote -> next peer | LOCAL
      |  no answer (dead, unreachable, deadline): QUARANTINE ---------> next peer | LOCAL
      |  caller gone (client disconnect, abort): QUARANTINE
    ADMITTED   engine.admit_remote streams the rest (first token included)
    LOCAL      engine.generate (prefill here)

    QUARANTINE (background): AbortRemotePrefill until it answers quiesced, or the
    RemotePrefill call answers, or the prefill worker's lease is gone (or it
    re-registered) -> cancel_remote.

NOTE: a reservation is freed only when no prefill worker can still write into
it: the notification arrived (then the engine owns it), the prefill worker
answered (any answer means it holds nothing), or its incarnation is gone from
etcd. Each attempt uses its own engine request id (``<rid>#p<i>``), so a
quarantined reservation never blocks the next attempt or the local fallback.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

import grpc
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind
from pdserve.v1 import worker_pb2, worker_pb2_grpc

from pdserve.cluster.kv_peers import KVPeers
from pdserve.cluster.orders import OrderBook
from pdserve.cluster.wire import params_to_proto
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tracing import Tracing, end_span, set_attributes
from pdserve.engine.async_engine import AsyncEngine, StreamOutput
from pdserve.engine.kv_connector import KVTransfers
from pdserve.engine.kv_transfer import KVCompatibilityError, check_compatible
from pdserve.cluster.tls import TLSFiles, open_channel

log = logging.getLogger(__name__)
_CONFIRMED = ("DONE", "ABORTED", "FAILED", "INCOMPATIBLE", "INVALID")


@dataclass(frozen=True)
class DecodeConfig:
    """Args:
        local_prefill_threshold: prompts whose uncached part is shorter prefill here.
        remote_prefill_timeout: deadline of one RemotePrefill call (queue + compute + transfer).
        notify_timeout: wait for the notification after the prefill answered DONE.
        abort_timeout: deadline of one AbortRemotePrefill call.
        release_retry: seconds between quarantine checks.
        tls: credentials for the channels to prefill workers (plaintext when empty).
    """

    local_prefill_threshold: int = 32
    remote_prefill_timeout: float = 120.0
    notify_timeout: float = 5.0
    abort_timeout: float = 5.0
    release_retry: float = 1.0
    tls: TLSFiles = TLSFiles()
    token: str = field(default="", repr=False)  # the cluster's token for Worker RPCs (rpc_auth)

    def __post_init__(self) -> None:
        if self.local_prefill_threshold < 0:
            raise ValueError(f"local_prefill_threshold={self.local_prefill_threshold} must be >= 0")
        for name in ("remote_prefill_timeout", "notify_timeout", "abort_timeout", "release_retry"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 seconds")


class DecodeMetrics(Protocol):
    """What the coordinator records (the worker's metrics implement it)."""

    def count_prefill(self, where: str, reason: str) -> None: ...

    def observe_kv(self, direction: str, blocks: int, nbytes: int) -> None: ...

    def observe_remote_prefill_latency(self, seconds: float) -> None: ...

    def observe_transfer_time(self, direction: str, nbytes: int, seconds: float, write_seconds: float) -> None: ...


@dataclass(frozen=True)
class PrefillPeer:
    worker_id: str
    grpc_address: str
    kv_agent: str


@dataclass
class Origin:
    """Filled while streaming: which worker computed the prompt ("" = this one)."""

    prefill_worker_id: str = ""


@dataclass(frozen=True)
class _Attempt:
    first: int | None = None
    reason: str = ""
    stop: bool = False  # no point trying another prefill worker


class DecodeCoordinator:
    def __init__(self, engine: AsyncEngine, peers: KVPeers, transfers: KVTransfers, config: DecodeConfig,
                 metrics: DecodeMetrics, orders: OrderBook | None = None, tracing: Tracing = Tracing()) -> None:
        self._engine = engine
        self._tracing = tracing
        self._orders = orders or OrderBook()
        self._peers = peers
        self._transfers = transfers
        self._config = config
        self._metrics = metrics
        self._layout = transfers.agent.layout
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._engine_ids: dict[str, str] = {}  # client request id -> engine request id
        self._background: set[asyncio.Task] = set()
        self.reservations = 0  # reserved, KV not admitted yet (quarantined included)
        self.counts = {"local": 0, "remote": 0}

    # ---- the request -----------------------------------------------------------
    async def generate(self, rid: str, prompt: list[int], params: SamplingParams, peers: list[PrefillPeer],
                       local_reason: str, origin: Origin, adapter: str | None = None,
                       span: Span = INVALID_SPAN) -> AsyncIterator[StreamOutput]:
        """Stream a request's outputs, prefilled remotely when possible (see the module docstring);
        ``span``: the worker's span of the request, parent of ``remote_prefill`` and ``admit``."""
        reason = local_reason or "no_prefill_worker"
        if peers and len(prompt) < self._config.local_prefill_threshold:
            peers, reason = [], "short"
        admit = INVALID_SPAN
        try:
            for index, peer in enumerate(peers):
                problem = self._unusable(peer, adapter)
                if problem is not None:
                    reason = problem
                    continue
                arid = f"{rid}#p{index}"
                attempt = await self._attempt(arid, prompt, params, peer, adapter, span)
                if attempt.first is not None:
                    origin.prefill_worker_id = peer.worker_id
                    self._count("remote", "disaggregated")
                    self._engine_ids[rid] = arid
                    admit = self._tracing.span("admit", span)
                    async for out in self._engine.admit_remote(arid, attempt.first):
                        end_span(admit)  # the first output holds the first token
                        yield out
                    return
                reason = attempt.reason
                if attempt.stop:
                    break
            self._count("local", reason)
            set_attributes(span, lambda: {"pdserve.local_prefill_reason": reason})
            async for out in self._engine.generate(rid, prompt, params, adapter):
                yield out
        finally:
            end_span(admit)
            self._engine_ids.pop(rid, None)

    def abort(self, rid: str) -> None:
        """Abort the engine request serving client request ``rid`` (a no-op when unknown)."""
        self._engine.abort(self._engine_ids.get(rid, rid))

    def _unusable(self, peer: PrefillPeer, adapter: str | None) -> str | None:
        record = self._peers.record_of(peer.worker_id)
        if record is None or record.kv_agent != peer.kv_agent:
            log.warning("prefill worker %s is not (or no longer) in discovery; skipping it", peer.worker_id)
            return "prefill_unknown"
        if adapter is not None and adapter not in record.adapters:
            log.warning("prefill worker %s has no adapter %r; skipping it", peer.worker_id, adapter)
            return "adapter_missing"
        try:
            check_compatible(self._peers.handshake, record.kv_handshake)
        except KVCompatibilityError as exc:
            log.warning("not pairing with prefill worker %s: %s", peer.worker_id, exc)
            return "incompatible"
        return None

    async def _attempt(self, arid: str, prompt: list[int], params: SamplingParams, peer: PrefillPeer,
                       adapter: str | None, parent: Span) -> _Attempt:
        record = self._peers.record_of(peer.worker_id)  # NOTE: its incarnation, before anything is reserved
        reserved = await self._reserve(arid, prompt, params, adapter)
        if reserved is None:
            return _Attempt(reason="decode_kv_full", stop=True)
        blocks, cached = reserved
        self.reservations += 1
        landed = self._transfers.expect(arid, peer.kv_agent)
        call: asyncio.Future | None = None
        settled = False
        span = INVALID_SPAN
        try:
            if len(prompt) - cached < self._config.local_prefill_threshold:
                return _Attempt(reason="cached", stop=True)  # nothing sent: freed below
            started = time.monotonic()
            span = self._tracing.span("remote_prefill", parent, lambda: {
                "pdserve.request_id": arid, "pdserve.prefill_worker": peer.worker_id,
                "pdserve.kv.blocks": len(blocks) - cached // self._layout.block_size,
                "pdserve.cached_tokens": cached}, kind=SpanKind.CLIENT)
            call = asyncio.ensure_future(self._stub(peer.grpc_address).RemotePrefill(
                self._order(arid, prompt, params, blocks, cached, peer, adapter),
                timeout=self._config.remote_prefill_timeout, metadata=self._tracing.inject(span)))
            first, reason, settled = await self._await_kv(arid, landed, call)
            if first is not None:
                self._observe_received(len(blocks) - cached // self._layout.block_size, time.monotonic() - started)
            end_span(span, reason or None)
            return _Attempt(first=first, reason=reason)
        finally:
            end_span(span, "abandoned before its KV landed")  # the caller went away (or an error)
            self._transfers.forget(arid)
            if settled:
                self.reservations -= 1
            else:
                self._spawn(self._release_when_safe(arid, peer, record.kv_metadata if record else "", call))

    async def _reserve(self, arid: str, prompt: list[int], params: SamplingParams,
                       adapter: str | None) -> tuple[list[int], int] | None:
        """``reserve_remote``; a reservation made while the caller was cancelled is freed, not lost."""
        task = asyncio.ensure_future(self._engine.reserve_remote(arid, prompt, params, adapter))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._free_if_reserved(arid, done))
            raise

    def _free_if_reserved(self, arid: str, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is None and task.result() is not None:
            self._spawn(self._engine.cancel_remote(arid))  # NOTE: no RemotePrefill was sent for it

    async def _await_kv(self, arid: str, landed: asyncio.Future, call: asyncio.Future) -> tuple[int | None, str, bool]:
        """(first token or None, failure reason, whether the reservation is settled).

        Settled means: admitted by the engine next (first token), or already freed.
        """
        await asyncio.wait({landed, call}, return_when=asyncio.FIRST_COMPLETED)
        if landed.done() and not landed.cancelled() and landed.exception() is None:
            self._spawn(self._observe_answer(call))
            return landed.result(), "", True
        answer, error = _answer(call) if call.done() else (None, "the KV transfer agent closed")
        if answer is None:
            log.warning("remote prefill %s got no answer (%s); its reservation waits for the prefill worker",
                        arid, error)
            return None, "prefill_unreachable", False
        status = worker_pb2.RemotePrefillResponse.Status.Name(answer.status)
        if status == "DONE":
            try:
                first = await asyncio.wait_for(landed, self._config.notify_timeout)
                self._observe_answer_now(answer)
                return first, "", True
            except Exception as exc:  # NOTE: DONE answered, so nothing is in flight: free it
                log.error("remote prefill %s answered DONE but no notification came: %s", arid, exc)
                status = "NOTIFY_TIMEOUT"
        else:
            log.warning("remote prefill %s: %s: %s", arid, status, answer.error)
        await asyncio.shield(self._engine.cancel_remote(arid))
        return None, f"prefill_{status.lower()}", True

    def _order(self, arid: str, prompt: list[int], params: SamplingParams, blocks: list[int],
               cached: int, peer: PrefillPeer, adapter: str | None) -> worker_pb2.RemotePrefillRequest:
        """The RemotePrefill request for ``peer``, signed when the cluster has a secret."""
        order = worker_pb2.RemotePrefillRequest(
            request_id=arid, prompt_token_ids=prompt, params=params_to_proto(params, with_stop_strings=False),
            decode_kv_agent=self._peers.name, decode_kv_handshake=json.dumps(self._peers.handshake),
            block_ids=blocks, num_cached_tokens=cached, decode_kv_incarnation=self._peers.incarnation,
            prefill_worker_id=peer.worker_id, adapter=adapter or "")
        self._orders.sign(order)
        return order

    # ---- quarantine --------------------------------------------------------------
    async def _release_when_safe(self, arid: str, peer: PrefillPeer, incarnation: str,
                                 call: asyncio.Future | None) -> None:
        """Free ``arid``'s reservation once the prefill worker can no longer write into it."""
        stub = self._stub(peer.grpc_address)
        try:
            while call is not None:
                if call.done() and _answer(call)[0] is not None:
                    break  # the prefill worker answered: it holds nothing
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.AbortRemotePrefill(worker_pb2.AbortRemotePrefillRequest(request_id=arid),
                                                          timeout=self._config.abort_timeout)
                    if reply.quiesced:
                        break
                if self._peers.is_gone(peer.worker_id, incarnation):
                    log.warning("prefill worker %s is gone; freeing the reservation of %s", peer.worker_id, arid)
                    break
                await asyncio.sleep(self._config.release_retry)
        finally:
            if call is not None:
                call.cancel()
            self.reservations -= 1
            await asyncio.shield(self._engine.cancel_remote(arid))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- metrics -----------------------------------------------------------------
    def _count(self, where: str, reason: str) -> None:
        self.counts[where] += 1
        self._metrics.count_prefill(where, reason)

    def _observe_received(self, blocks: int, seconds: float) -> None:
        layout = self._layout
        nbytes = blocks * layout.num_layers * layout.block_bytes * layout.tp_size  # every rank's shard
        self._metrics.observe_kv("received", blocks, nbytes)
        self._metrics.observe_remote_prefill_latency(seconds)

    async def _observe_answer(self, call: asyncio.Future) -> None:
        """The KV landed before the answer; record the answer's timings when it comes."""
        await asyncio.wait({call})  # NOTE: bounded by the call's own deadline
        answer, _ = _answer(call)
        if answer is not None:
            self._observe_answer_now(answer)

    def _observe_answer_now(self, answer: worker_pb2.RemotePrefillResponse) -> None:
        if answer.transfer_seconds > 0:
            self._metrics.observe_transfer_time("received", answer.num_bytes_sent, answer.transfer_seconds,
                                                answer.write_seconds)

    # ---- channels ----------------------------------------------------------------
    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self._config.tls, token=self._config.token)
        return worker_pb2_grpc.WorkerStub(channel)

    async def close(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for quarantined reservations, then close the channels."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)
        for task in list(self._background):
            task.cancel()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def _answer(call: asyncio.Future) -> tuple[worker_pb2.RemotePrefillResponse | None, str]:
    """(the prefill worker's answer, or None with why there is none)."""
    if call.cancelled():
        return None, "cancelled"
    exc = call.exception()
    if exc is None:
        return call.result(), ""
    if isinstance(exc, grpc.aio.AioRpcError):
        return None, f"{exc.code().name}: {exc.details()}"
    return None, repr(exc)
