"""The KV connector inside one rank process of a tensor-parallel engine: this rank's
transfer agent and the sends of its KV-cache shard.

Owns: the agent over the rank's shard (built once the shard exists, named
``rank_agent_name(worker, rank)``), this rank's send jobs (request id -> order and
posted writes), the ids of cancelled jobs, and the events the rank process
forwards to its worker process.

Lifecycle: ``RankKVEndpoint(agent)`` -> commands from the worker process between
steps (``handle``: add or remove a peer, cancel a job, send a notification) ->
per step, as the rank's ``LayerSender``, ``begin_step`` returns the hook that
posts each layer of the jobs this step completes (their orders came in the plan)
-> ``poll()`` after every step and command, and on a short timer while anything
is in flight, returns the events (a job's end, received notifications, refused
peers) -> ``close()``.

Events (plain tuples, they cross a pipe):
  ``("job", rid, status, error, nbytes)``: every write of the job is over
  (status DONE, FAILED or ABORTED); sent once per job, and once for every
  cancel of a job this rank has not started.
  ``("notif", sender, msg)``: a notification this rank's agent received.
  ``("peer_error", name, error)``: a peer could not be loaded.

NOTE: every agent call happens on the rank process's one thread: the layer hook
runs inside the step, commands and polls between steps.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.kv_connector.worker_side import LayerHook
from pdserve.engine.kv_transfer import KVTransferAgent, KVTransferError, TransferHandle, TransferState
from pdserve.engine.kv_transfer.heads import write_to_worker
from pdserve.engine.plan import KVSendOrder, PlannedRow

log = logging.getLogger(__name__)
Event = tuple[Any, ...]
_TOMBSTONES = 10_000


@dataclass
class _Job:
    rid: str
    order: KVSendOrder
    local: list[int]
    remote: list[int]
    num_layers: int
    handles: list[TransferHandle] = field(default_factory=list)
    layers_posted: int = 0
    nbytes: int = 0
    error: str = ""
    cancelled: bool = False

    @property
    def posted(self) -> bool:
        return self.cancelled or bool(self.error) or self.layers_posted == self.num_layers


class RankKVEndpoint:
    def __init__(self, agent: KVTransferAgent) -> None:
        self.agent = agent
        self._jobs: dict[str, _Job] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._events: list[Event] = []

    @property
    def busy(self) -> bool:
        """Writes in flight: poll soon."""
        return bool(self._jobs)

    @property
    def has_peers(self) -> bool:
        return bool(self.agent.peers())

    # ---- commands from the worker process ------------------------------------------
    def handle(self, command: tuple[Any, ...]) -> None:
        name, args = command[0], command[1:]
        if name == "add_peer":
            self._add_peer(*args)
        elif name == "remove_peer":
            self.agent.remove_peer(*args)
        elif name == "cancel":
            self._cancel(*args)
        elif name == "notify":
            self._notify(*args)
        else:
            log.error("unknown KV command %r", name)

    def _add_peer(self, name: str, metadata: bytes) -> None:
        try:
            self.agent.add_peer(name, metadata)
        except Exception as exc:  # NOTE: reported to the worker, which refuses the peer
            self._events.append(("peer_error", name, str(exc)))

    def _cancel(self, rid: str) -> None:
        self._cancelled[rid] = None
        while len(self._cancelled) > _TOMBSTONES:
            self._cancelled.popitem(last=False)
        job = self._jobs.get(rid)
        if job is None:
            self._events.append(("job", rid, "ABORTED", "no write of it in flight here", 0))
        else:
            job.cancelled = True

    def _notify(self, peer: str, msg: bytes) -> None:
        try:
            self.agent.send_notify(peer, msg)
        except KVTransferError as exc:
            log.warning("KV notification to %s failed: %s", peer, exc)

    # ---- the layer sender (inside a step) --------------------------------------------
    def begin_step(self, rows: tuple[PlannedRow, ...], tables: list[list[int]],
                   orders: list[KVSendOrder | None]) -> LayerHook | None:
        batch: list[_Job] = []
        num_layers = self.agent.layout.num_layers
        for row, table, order in zip(rows, tables, orders):
            if order is None or not row.samples or row.req_id in self._cancelled or row.req_id in self._jobs:
                continue
            job = _Job(row.req_id, order, list(table[order.skip:len(order.block_ids)]),
                       list(order.block_ids[order.skip:]), num_layers)
            self._jobs[row.req_id] = job
            batch.append(job)
        if not batch:
            return None

        def on_layer(layer: int, written: Any) -> None:
            if not written.query():
                written.synchronize()
            for job in batch:
                if job.order.layerwise:
                    self._post(job, range(layer, layer + 1))
                elif layer == num_layers - 1:
                    self._post(job, range(num_layers), num_layers)
        return on_layer

    def _post(self, job: _Job, layers: range, count: int = 1) -> None:
        if job.cancelled or job.error:
            return
        try:
            posted = write_to_worker(self.agent, job.order.peer, job.local, job.remote, layers)
        except (KVTransferError, ValueError) as exc:
            job.error = str(exc)
            return
        job.handles.extend(posted)
        job.nbytes += sum(h.num_bytes for h in posted)
        job.layers_posted += count

    # ---- between steps -------------------------------------------------------------------
    def poll(self) -> list[Event]:
        """Progress the agent; the events since the last poll."""
        try:
            for sender, msg in self.agent.get_notifications():
                self._events.append(("notif", sender, msg))
        except Exception as exc:
            log.warning("KV progress failed: %s", exc)
        for rid in [rid for rid, job in self._jobs.items() if job.posted]:
            self._finish_if_over(self._jobs[rid])
        events, self._events = self._events, []
        return events

    def _finish_if_over(self, job: _Job) -> None:
        states = [self._state(h) for h in job.handles]
        if not all(s.finished for s in states):
            return
        for handle in job.handles:
            self.agent.release(handle)
        del self._jobs[job.rid]
        if job.cancelled:
            status, error = "ABORTED", "cancelled"
        elif job.error or any(s is TransferState.FAILED for s in states):
            status, error = "FAILED", job.error or f"a KV write of {job.rid} failed"
        else:
            status, error = "DONE", ""
        self._events.append(("job", job.rid, status, error, job.nbytes))

    def _state(self, handle: TransferHandle) -> TransferState:
        try:
            return self.agent.poll(handle)
        except KVTransferError:
            return TransferState.FAILED

    def close(self) -> None:
        self.agent.close()


__all__ = ["RankKVEndpoint"]
