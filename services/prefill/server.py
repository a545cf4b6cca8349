"""Prefill side of disaggregation: compute a prompt for a decode worker and WRITE its KV there.

Owns: the remote-prefill jobs of this worker (by request id), the engine's layer
sender (the KV connector's worker side: it posts each layer's writes as soon as
that layer's KV exists), the tombstones of aborted request ids, and the debug delay.

Request state machine (one ``RemotePrefill`` call):

    ACCEPTED ---(tombstoned / draining / bad request / incompatible)--> answered, nothing held
       |  peer loaded, job registered
    COMPUTING   engine.prefill_held(); in the step that completes the prompt, the
       |        layer sender posts layer l's writes right after layer l is computed
    SENDING     every layer posted; wait until all writes are DONE (timeout)
       |        then send_notify(decode, {rid, first token})
    DONE
    (any state) --abort / caller gone / error--> ABORTED | FAILED

On every exit, in this order: the job stops accepting layer posts, the posted
writes are waited for (bounded; then the peer is dropped, which fails them) and
released, and ``release_held`` frees the blocks. Only then does the RPC answer.

NOTE: an answer of this server (any status) means no write of the request is in
flight and none will start: the decode worker may free its reservation. An
aborted id is tombstoned, so a RemotePrefill that arrives after its abort is
refused instead of writing into freed blocks.
NOTE: only the first ``num_cached_tokens // block_size`` destination blocks are
skipped (the decode worker has them); the last, partial block is sent whole.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from opentelemetry.context import Context

from pdserve.cluster.kv_peers import KVPeers, PeerIncompatible, PeerUnavailable
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tracing import Tracing
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.kv_connector import KVTransfers, LayerHook
from pdserve.engine.kv_connector.rank_agents import RankAgents
from pdserve.engine.kv_transfer import (KVCompatibilityError, KVTransferError, TransferHandle, check_compatible,
                                         wait)
from pdserve.engine.kv_transfer.heads import write_to_worker
from pdserve.engine.plan import KVSendOrder, PlannedRow

log = logging.getLogger(__name__)

SEND_MODES = ("layerwise", "whole")


@dataclass(frozen=True)
class PrefillConfig:
    """Args:
        transfer_timeout: seconds to wait for posted writes to be DONE.
        peer_wait: seconds to wait for the decode worker to appear in discovery.
        send: ``layerwise`` (overlap with compute) or ``whole`` (one write after compute).
        tombstones: how many aborted request ids to remember.
        layer_poll: seconds between checks that the device has written a layer.
    """

    transfer_timeout: float = 30.0
    peer_wait: float = 3.0
    send: str = "layerwise"
    tombstones: int = 10_000
    layer_poll: float = 0.0002

    def __post_init__(self) -> None:
        if self.send not in SEND_MODES:
            raise ValueError(f"kv_send={self.send!r} is invalid: expected one of {SEND_MODES}")
        if not (self.transfer_timeout > 0 and self.peer_wait >= 0 and self.layer_poll > 0):
            raise ValueError("transfer_timeout and layer_poll must be > 0 and peer_wait >= 0")


@dataclass(frozen=True)
class PrefillOrder:
    """What the decode worker asks for (decoded from the RPC by the servicer)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    decode_agent: str
    decode_handshake: dict[str, Any]
    block_ids: list[int]
    num_cached_tokens: int
    decode_incarnation: str = ""
    adapter: str | None = None  # LoRA adapter the prompt is computed with


@dataclass(frozen=True)
class PrefillResult:
    status: str  # DONE | ABORTED | FAILED | INCOMPATIBLE | INVALID
    error: str = ""
    first_token: int = 0
    blocks_sent: int = 0
    bytes_sent: int = 0
    num_cached_tokens: int = 0
    compute_seconds: float = 0.0
    tail_seconds: float = 0.0
    transfer_seconds: float = 0.0
    write_seconds: float = 0.0
    handover_seconds: float = 0.0
    phase: str = ""  # where an abort/failure found the job


@dataclass
class _Job:
    order: PrefillOrder
    skip: int  # destination blocks the decode worker already has
    num_blocks: int  # blocks covering the prompt
    num_layers: int
    accepted: float = field(default_factory=time.monotonic)
    phase: str = "queued"  # queued -> computing -> sending -> done
    handles: list[TransferHandle] = field(default_factory=list)
    layers_posted: int = 0
    error: str | None = None
    closed: bool = False
    aborted: bool = False
    posted: asyncio.Event = field(default_factory=asyncio.Event)
    first_post: float = 0.0
    last_post_end: float = 0.0
    last_layer: float = 0.0
    post_seconds: float = 0.0
    bytes_sent: int = 0
    handles_over: bool = False  # (ranks) every rank reported the end of its writes

    @property
    def remote(self) -> list[int]:
        return self.order.block_ids[self.skip:self.num_blocks]


class PrefillServer:
    """Serves RemotePrefill / AbortRemotePrefill for one engine and one KV agent."""

    def __init__(self, engine: AsyncEngine, peers: KVPeers, transfers: KVTransfers, config: PrefillConfig,
                 on_result: Callable[[PrefillResult], None] = lambda _: None, tracing: Tracing = Tracing()) -> None:
        self._engine = engine
        self._tracing = tracing
        self._peers = peers
        self._transfers = transfers
        self._agent = transfers.agent
        self._config = config
        self._on_result = on_result
        self._ranked = isinstance(self._agent, RankAgents)  # a tensor-parallel engine: its ranks send
        self._block_size = self._agent.layout.block_size
        self._num_layers = self._agent.layout.num_layers
        self._jobs: dict[str, _Job] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.debug_delay = 0.0  # seconds between "all layers posted" and the DONE wait (tests)

    def install(self) -> None:
        """Become the engine's layer sender (call once, on the serving loop)."""
        self._loop = asyncio.get_running_loop()
        if not self._ranked:
            self._engine.attach_layer_sender(self)

    @property
    def active(self) -> int:
        return len(self._tasks)

    @property
    def sending(self) -> int:
        return sum(job.phase == "sending" for job in self._jobs.values())

    # ---- RPCs ------------------------------------------------------------------
    async def remote_prefill(self, order: PrefillOrder, parent: Context | None = None) -> PrefillResult:
        """Run one job to its end; never raises except when the caller is cancelled. ``parent``:
        the trace context of the order (the decode worker's ``remote_prefill`` span)."""
        rid = order.request_id
        refused = self._refusal(order)
        if refused is not None:
            return self._finish(refused)
        try:
            await self._peers.wait_peer(order.decode_agent, self._config.peer_wait, order.decode_incarnation)
        except PeerIncompatible as exc:
            return self._finish(PrefillResult("INCOMPATIBLE", str(exc)))
        except PeerUnavailable as exc:
            return self._finish(PrefillResult("FAILED", str(exc)))
        if rid in self._tombstones:  # aborted while we waited for the peer
            return self._finish(PrefillResult("ABORTED", f"request {rid} was aborted", phase="queued"))
        job = _Job(order, order.num_cached_tokens // self._block_size, len(order.block_ids), self._num_layers)
        self._jobs[rid] = job
        task = self._tasks[rid] = asyncio.get_running_loop().create_task(self._run(job), name=f"remote-prefill-{rid}")
        try:
            result = await task
        except asyncio.CancelledError:
            if not job.aborted or _cancelling():
                raise
            result = PrefillResult("ABORTED", f"request {rid} was aborted", phase=job.phase)
        finally:  # NOTE: the task is done here (a cancelled await waits for its cleanup)
            self._jobs.pop(rid, None)
            self._tasks.pop(rid, None)
        self._trace(job, result, parent)
        return self._finish(result)

    async def abort(self, request_id: str, timeout: float) -> tuple[bool, bool]:
        """Drop a job; returns (found, quiesced) once its writes are over (or ``timeout``)."""
        self._tombstone(request_id)
        job, task = self._jobs.get(request_id), self._tasks.get(request_id)
        if task is None:
            return job is not None, True
        if job is not None:
            job.aborted = True
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        return True, bool(done)

    async def abort_all(self, timeout: float) -> None:
        await asyncio.gather(*(self.abort(rid, timeout) for rid in list(self._tasks)))

    # ---- the job -----------------------------------------------------------------
    def _refusal(self, order: PrefillOrder) -> PrefillResult | None:
        if self.draining:
            return PrefillResult("FAILED", "prefill worker is draining")
        if order.request_id in self._tombstones or order.request_id in self._tasks:
            return PrefillResult("ABORTED", f"request {order.request_id} was aborted or is already running")
        try:
            check_compatible(self._peers.handshake, order.decode_handshake)
        except KVCompatibilityError as exc:
            return PrefillResult("INCOMPATIBLE", str(exc))
        bs, n = self._block_size, len(order.prompt)
        if not order.prompt or len(order.block_ids) != math.ceil(n / bs):
            return PrefillResult("INVALID", f"{len(order.block_ids)} destination blocks for a {n}-token prompt: "
                                            f"expected {math.ceil(n / bs)} (block size {bs})")
        cached = order.num_cached_tokens
        if cached % bs or not 0 <= cached < n:
            return PrefillResult("INVALID", f"num_cached_tokens={cached} must be a multiple of {bs} below {n}")
        return None

    async def _run(self, job: _Job) -> PrefillResult:
        rid = job.order.request_id
        try:
            with self._transfers.busy():
                return await self._compute_and_send(job)
        except (KVTransferError, RuntimeError, ValueError, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            return PrefillResult("FAILED", f"remote prefill of {rid} failed while {job.phase}: {why}", phase=job.phase)
        finally:
            job.closed = True  # NOTE: later layer callbacks of this job post nothing
            await self._quiesce(job)
            self._engine.release_held(rid)
            self._jobs.pop(rid, None)
            self._tasks.pop(rid, None)

    async def _compute_and_send(self, job: _Job) -> PrefillResult:
        if self._ranked:
            return await self._compute_in_ranks(job)
        order = job.order
        job.phase = "computing"
        first, local_blocks, cached_here = await self._engine.prefill_held(order.request_id, order.prompt, order.params,
                                                                           adapter=order.adapter)
        if self._config.send == "whole":
            job.last_layer = job.last_layer or time.monotonic()
            self._post(job, local_blocks[job.skip:job.num_blocks], range(job.num_layers))
            job.layers_posted = job.num_layers
            job.posted.set()
        await asyncio.wait_for(job.posted.wait(), self._config.transfer_timeout)
        job.phase = "sending"
        if job.error is not None:
            raise KVTransferError(job.error)
        if self.debug_delay:
            await asyncio.sleep(self.debug_delay)
        done_when_posted = all(self._finished(h) for h in job.handles)
        await wait(self._agent, job.handles, self._config.transfer_timeout)
        # NOTE: on CPU a post copies, so writes are often DONE when the post returns
        done = job.last_post_end if done_when_posted else time.monotonic()
        self._transfers.notify_done(order.decode_agent, order.request_id, first)
        job.phase = "done"
        return self._result(job, first, cached_here, done)

    async def _compute_in_ranks(self, job: _Job) -> PrefillResult:
        """The ranks post their own writes as they compute (the order rides in the step
        plan); wait for every rank's report, then notify the decode worker."""
        order, agent = job.order, self._agent
        send = KVSendOrder(order.decode_agent, tuple(order.block_ids[:job.num_blocks]), job.skip,
                           self._config.send == "layerwise")
        reports = agent.track(order.request_id)
        job.phase = "computing"
        first, _, cached_here = await self._engine.prefill_held(order.request_id, order.prompt, order.params, send,
                                                                adapter=order.adapter)
        job.last_layer = job.first_post = time.monotonic()
        job.phase = "sending"
        ends = await asyncio.wait_for(asyncio.shield(reports), self._config.transfer_timeout)
        job.handles_over = True
        failed = [f"rank {r}: {e.error}" for r, e in enumerate(ends) if e.status != "DONE"]
        if failed:
            raise KVTransferError("; ".join(failed))
        job.bytes_sent = sum(e.nbytes for e in ends)
        done = job.last_post_end = time.monotonic()
        self._transfers.notify_done(order.decode_agent, order.request_id, first)
        job.phase = "done"
        return self._result(job, first, cached_here, done)

    def _result(self, job: _Job, first: int, cached_here: int, done: float) -> PrefillResult:
        return PrefillResult(
            "DONE", first_token=first, blocks_sent=job.num_blocks - job.skip, bytes_sent=job.bytes_sent,
            num_cached_tokens=cached_here, compute_seconds=job.last_layer - job.accepted,
            tail_seconds=max(0.0, done - job.last_layer), transfer_seconds=done - job.first_post,
            write_seconds=job.post_seconds + max(0.0, done - job.last_post_end),
            handover_seconds=time.monotonic() - job.last_layer)

    async def _quiesce(self, job: _Job) -> None:
        """Wait (bounded) until every posted write is DONE or FAILED, then release them all.

        NOTE: past the timeout the decode peer is dropped, which fails its writes at
        the transport (and is loaded again from discovery): after this returns no
        write of the job can land.
        """
        if self._ranked:
            return await self._quiesce_ranks(job)
        deadline = time.monotonic() + self._config.transfer_timeout
        while not all(self._finished(h) for h in job.handles):
            if time.monotonic() >= deadline:
                log.error("writes of %s still in flight after %.1f s: dropping KV peer %s to fail them",
                          job.order.request_id, self._config.transfer_timeout, job.order.decode_agent)
                self._peers.reload(job.order.decode_agent)
                break
            self._agent.progress()
            await asyncio.sleep(0.0005)
        for handle in job.handles:
            self._agent.release(handle)
        job.handles.clear()

    async def _quiesce_ranks(self, job: _Job) -> None:
        """Every rank stops posting the job's writes and reports once none is in flight."""
        rid, agent = job.order.request_id, self._agent
        try:
            if not job.handles_over:
                reports = agent.track(rid)
                agent.cancel(rid)
                await asyncio.wait_for(reports, self._config.transfer_timeout)
        except (asyncio.TimeoutError, KVTransferError) as exc:
            log.error("writes of %s may still be in flight (%s): dropping KV peer %s to fail them", rid,
                      exc or "timeout", job.order.decode_agent)
            self._peers.reload(job.order.decode_agent)
        finally:
            agent.untrack(rid)

    def _finished(self, handle: TransferHandle) -> bool:
        try:
            return self._agent.poll(handle).finished
        except KVTransferError:
            return True

    # ---- the layer sender (engine step thread) -----------------------------------
    def begin_step(self, rows: tuple[PlannedRow, ...], tables: list[list[int]],
                   orders: list[KVSendOrder | None]) -> LayerHook | None:
        """Called by the rank before a step; returns the per-layer hook or None (the
        jobs are this server's own: ``orders`` are for ranks that send themselves)."""
        if not self._jobs:
            return None
        batch: list[tuple[_Job, list[int]]] = []
        for row, table in zip(rows, tables):
            job = self._jobs.get(row.req_id)
            if job is not None and row.samples:  # this step completes the prompt
                batch.append((job, list(table[job.skip:job.num_blocks])))
        if not batch:
            return None
        loop, layerwise, last = self._loop, self._config.send == "layerwise", self._num_layers - 1

        def on_layer(layer: int, written: Any) -> None:
            # NOTE: runs in the step thread; every NIXL call stays on the loop thread.
            if layerwise or layer == last:
                loop.call_soon_threadsafe(self._when_written, batch, layer, written)
        return on_layer

    def _when_written(self, batch: list[tuple[_Job, list[int]]], layer: int, written: Any) -> None:
        """Post the layer once the device has written its KV (the host queues layers
        ahead of the device; a write posted earlier would send stale blocks)."""
        if written.query():
            self._on_layer(batch, layer, time.monotonic())
        else:
            self._loop.call_later(self._config.layer_poll, self._when_written, batch, layer, written)

    def _on_layer(self, batch: list[tuple[_Job, list[int]]], layer: int, computed_at: float) -> None:
        for job, local in batch:
            if job.closed:
                continue
            if self._config.send == "layerwise":
                self._post(job, local, range(layer, layer + 1))
                job.layers_posted += 1
            if layer == job.num_layers - 1:
                job.last_layer = computed_at
            if job.layers_posted == job.num_layers:
                job.posted.set()

    def _post(self, job: _Job, local: list[int], layers: range) -> None:
        if job.error is not None:
            return
        start = time.monotonic()
        job.first_post = job.first_post or start
        try:
            posted = write_to_worker(self._agent, job.order.decode_agent, local, job.remote, layers)
            job.handles.extend(posted)
            job.bytes_sent += sum(h.num_bytes for h in posted)
        except (KVTransferError, ValueError) as exc:
            job.error = str(exc)
            job.posted.set()
        job.last_post_end = time.monotonic()
        job.post_seconds += job.last_post_end - start

    # ---- bookkeeping -------------------------------------------------------------
    def _trace(self, job: _Job, result: PrefillResult, parent: Context | None) -> None:
        """The job's spans: ``prefill`` (accepted -> its last layer computed) and ``kv_transfer``
        (first write posted -> every write done; with layerwise sends it overlaps the compute)."""
        if not self._tracing.enabled:
            return
        now, order = time.monotonic(), job.order
        error = None if result.status == "DONE" else f"{result.status}: {result.error}"
        self._tracing.record("prefill", parent, job.accepted, job.last_layer or now, lambda: {
            "pdserve.request_id": order.request_id, "pdserve.prompt_tokens": len(order.prompt),
            "pdserve.cached_tokens": result.num_cached_tokens, "pdserve.adapter": order.adapter or ""},
            None if job.last_layer and job.first_post else error)
        if job.first_post:
            end = job.first_post + result.transfer_seconds if error is None else now
            self._tracing.record("kv_transfer", parent, job.first_post, end, lambda: self._transfer_attributes(job),
                                 error)

    def _transfer_attributes(self, job: _Job) -> dict[str, Any]:
        return {"pdserve.kv.bytes": job.bytes_sent, "pdserve.kv.blocks": job.num_blocks - job.skip,
                "pdserve.kv.layers": job.num_layers, "pdserve.kv.send": self._config.send,
                "pdserve.kv.decode_agent": job.order.decode_agent}

    def _tombstone(self, request_id: str) -> None:
        self._tombstones[request_id] = None
        self._tombstones.move_to_end(request_id)
        while len(self._tombstones) > self._config.tombstones:
            self._tombstones.popitem(last=False)

    def _finish(self, result: PrefillResult) -> PrefillResult:
        self._on_result(result)
        return result


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
