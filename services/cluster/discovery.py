"""The router's view of live workers, kept in sync with etcd by a prefix watch.

Lifecycle: ``start()`` reads every key under the namespace (raises if etcd is
unreachable at startup) -> a background task watches the prefix from the next
revision and applies puts and deletes (a worker appears within a second of
registering and disappears when its lease is revoked or expires) -> ``stop()``.

NOTE: when etcd is unreachable the last known set is kept and served; the watch
reconnects by itself, and after any watch failure the task re-reads the whole
prefix so missed deletes cannot leave ghosts behind.
NOTE: an etcd that lost its data (restarted with an empty data dir) starts again at
revision 1 under a new cluster id, and a reconnected watch would wait for revisions
of the old one. A probe reads etcd's header every ``probe_interval`` seconds; a
revision that went backwards or another cluster id re-reads the prefix and watches
from the new revision. The workers re-register within a few seconds (their leases
died with the data); until ``grace`` seconds have passed, a worker missing from the
new etcd is still served (as while etcd is down), then the prefix is read again and
the ones that did not come back are dropped.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable

import grpc
from etcd3aio import Etcd3Client, EtcdError, prefix_range_end

from pdserve.cluster.keys import KeySpace
from pdserve.cluster.records import LoadReport, WorkerRecord

log = logging.getLogger(__name__)
PUT, DELETE = 0, 1


class Discovery:
    """Live workers (``records``) and their latest load (``loads``), by worker id."""

    def __init__(self, client: Etcd3Client, keys: KeySpace, probe_interval: float = 1.0, grace: float = 15.0) -> None:
        self._client = client
        self._keys = keys
        self._probe_interval = probe_interval
        self._grace = grace
        self._seen = (0, 0)  # (cluster id, highest revision) of the etcd we read
        self._keep_until = 0.0  # loop time: a worker missing from a read is kept until then
        self._kept: set[str] = set()  # kept that way, not seen in the new etcd yet
        self.records: dict[str, WorkerRecord] = {}
        self.loads: dict[str, LoadReport] = {}
        self._listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task | None = None

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every change of the worker records (a worker
        joining, leaving, or re-registering with a new record, e.g. after a restart)."""
        self._listeners.append(callback)

    def live(self, role: str | None = None) -> list[WorkerRecord]:
        """Live workers (of one role if given), in a stable order."""
        return sorted((r for r in self.records.values() if role is None or r.role == role), key=lambda r: r.id)

    def load(self, worker_id: str) -> LoadReport:
        return self.loads.get(worker_id) or LoadReport(timestamp=0.0)

    async def start(self) -> None:
        revision = await self._resync()
        self._task = asyncio.create_task(self._run(revision), name="discovery-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _resync(self) -> int:
        """Replace the view with a full read; returns the read's revision."""
        prefix = self._keys.prefix
        response = await self._client.kv.get(prefix, range_end=prefix_range_end(prefix), timeout=5.0)
        records, loads = {}, {}
        for kv in response.kvs:
            self._apply(kv.key.decode(), kv.value, PUT, records, loads)
        if self._lost_data(response.header):  # NOTE: also seen here when the watch failed first
            log.warning("etcd changed (cluster %x revision %d, was %x revision %d: restarted without its data?); "
                        "re-read every worker, keeping the missing ones %.0f s", response.header.cluster_id,
                        response.header.revision, *self._seen, self._grace)
            self._keep_until = asyncio.get_running_loop().time() + self._grace
        kept = {}
        if asyncio.get_running_loop().time() < self._keep_until:
            kept = {w: r for w, r in self.records.items() if w not in records}
            records.update(kept)
        self._kept = set(kept)
        changed = records != self.records
        self.records, self.loads = records, loads
        self._seen = (response.header.cluster_id, response.header.revision)
        if changed:
            self._notify()
        return response.header.revision

    async def _run(self, revision: int) -> None:
        delay = 0.2
        while True:
            try:
                await _first_of(self._watch(revision + 1), self._probe())
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
                log.warning("etcd watch failed (%s); serving the last known %d workers", exc, len(self.records))
            except Exception:  # NOTE: the watch must never die, or the view goes stale for good
                log.exception("etcd watch broke; resyncing")
            await asyncio.sleep(delay)
            try:
                revision = await self._resync()
                delay = 0.2
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
                log.warning("etcd resync failed (%s); retrying", exc)
                delay = min(delay * 2, 2.0)

    async def _watch(self, start_revision: int) -> None:
        prefix = self._keys.prefix
        stream = self._client.watch.watch(prefix, range_end=prefix_range_end(prefix), start_revision=start_revision)
        async for response in stream:
            if response.compact_revision or response.canceled:
                return  # history is gone or the server dropped us: resync
            before = dict(self.records)
            for event in response.events:
                self._apply(event.kv.key.decode(), event.kv.value, event.type, self.records, self.loads)
            if self.records != before:
                self._notify()

    async def _probe(self) -> None:
        """Return once etcd is not the one we watch any more (data lost, another cluster),
        or the grace for workers missing after that is over."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._probe_interval)
            if self._kept and loop.time() >= self._keep_until:
                log.info("workers %s did not register again; dropping them", sorted(self._kept))
                return
            try:
                header = (await self._client.kv.get(self._keys.prefix, count_only=True, timeout=2.0)).header
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError):
                continue  # unreachable: the watch reconnects by itself; keep serving what we know
            if self._lost_data(header):
                return  # the resync keeps the missing workers for the grace
            self._seen = (header.cluster_id, header.revision)

    def _lost_data(self, header: Any) -> bool:
        """Whether etcd's ``header`` shows another etcd than the one read before."""
        cluster, revision = self._seen
        return bool(revision) and (header.cluster_id != cluster or header.revision < revision)

    def _apply(self, key: str, value: bytes, kind: int, records: dict, loads: dict) -> None:
        parsed = self._keys.parse(key)
        if parsed is None:
            return
        what, worker_id = parsed
        target = records if what == "worker" else loads
        if kind == DELETE:
            target.pop(worker_id, None)
            if what == "worker":
                log.info("worker %s left", worker_id)
            return
        try:
            target[worker_id] = (WorkerRecord if what == "worker" else LoadReport).from_json(value)
        except ValueError as exc:
            log.warning("ignoring malformed %s: %s", key, exc)
            return
        if what == "worker":
            log.info("worker %s at %s", worker_id, target[worker_id].grpc_address)

    def _notify(self) -> None:
        for callback in self._listeners:
            callback()


async def _first_of(*coros: Any) -> None:
    """Run the coroutines until the first one ends; cancel the rest; re-raise its error."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()
