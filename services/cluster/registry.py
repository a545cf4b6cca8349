"""One worker's presence in etcd.

Lifecycle: ``start()`` grants a lease (TTL ~10 s) and writes the WorkerRecord and a
first LoadReport under it -> a background task keeps the lease alive (every TTL/3)
and republishes load (about once a second) -> ``stop()`` revokes the lease, which
deletes both keys at once (the router sees the worker disappear immediately).

If the lease is lost (etcd restarted, a long partition) the task grants a new one
and writes both keys again; while etcd is unreachable it logs and retries, the
worker keeps serving. When the process dies without ``stop()`` the keys vanish
when the lease expires.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable

from etcd3aio import Etcd3Client, EtcdError
import grpc

from pdserve.cluster.keys import KeySpace
from pdserve.cluster.records import LoadReport, WorkerRecord

log = logging.getLogger(__name__)


class Registration:
    """Keeps ``record`` registered and its load published while the worker lives."""

    def __init__(self, client: Etcd3Client, keys: KeySpace, record: WorkerRecord,
                 load: Callable[[], LoadReport], ttl: int = 10, load_interval: float = 1.0) -> None:
        self._client = client
        self._keys = keys
        self._record = record
        self._load = load
        self._ttl = ttl
        self._load_interval = load_interval
        self._lease_id: int | None = None
        self._task: asyncio.Task | None = None

    @property
    def worker_key(self) -> str:
        return self._keys.worker_key(self._record.role, self._record.id)

    async def start(self) -> None:
        """Register now (raises if etcd is unreachable), then keep it up in the background."""
        await self._register()
        self._task = asyncio.create_task(self._run(), name=f"registration-{self._record.id}")

    async def stop(self) -> None:
        """Stop publishing and revoke the lease (deletes the worker's keys)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._lease_id is not None:
            lease_id, self._lease_id = self._lease_id, None
            try:
                await self._client.lease.revoke(lease_id, timeout=3.0)
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
                log.warning("could not revoke lease %x (keys expire with it): %s", lease_id, exc)

    async def republish(self, record: WorkerRecord) -> None:
        """Replace the record (e.g. its adapters changed) under the current lease."""
        self._record = record
        if self._lease_id is not None:
            await self._client.kv.put(self.worker_key, record.to_json(), lease=self._lease_id, timeout=5.0)

    async def publish_load(self) -> None:
        """Write the current load now (also done periodically)."""
        if self._lease_id is not None:
            await self._client.kv.put(self._keys.load_key(self._record.id), self._load().to_json(),
                                      lease=self._lease_id, timeout=3.0)

    async def _register(self) -> None:
        grant = await self._client.lease.grant(self._ttl, timeout=5.0)
        self._lease_id = grant.ID
        await self._client.kv.put(self.worker_key, self._record.to_json(), lease=grant.ID, timeout=5.0)
        await self.publish_load()
        log.info("registered %s under lease %x (ttl %ss)", self.worker_key, grant.ID, grant.TTL)

    async def _run(self) -> None:
        next_keepalive = time.monotonic() + self._ttl / 3
        while True:
            await asyncio.sleep(self._load_interval)
            try:
                if self._lease_id is None:
                    await self._register()
                if time.monotonic() >= next_keepalive:
                    next_keepalive = time.monotonic() + self._ttl / 3
                    if not await self._keepalive():
                        log.warning("lease of %s was lost; registering again", self.worker_key)
                        self._lease_id = None
                        continue
                await self.publish_load()
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
                log.warning("etcd unreachable (%s); still serving, retrying", exc)
                if _lease_gone(exc):
                    self._lease_id = None
            except Exception:  # NOTE: this task must outlive any one bad tick, or the lease lapses
                log.exception("registration tick failed; retrying")

    async def _keepalive(self) -> bool:
        """Renew the lease once; False when etcd says it no longer exists."""
        stream = self._client.lease.keep_alive(self._lease_id)
        try:
            async with asyncio.timeout(3.0):
                async for response in stream:
                    return response.TTL > 0
        finally:
            stream.cancel()
        return False


def _lease_gone(exc: BaseException) -> bool:
    cause = exc.__cause__ if isinstance(exc, EtcdError) else exc
    return isinstance(cause, grpc.aio.AioRpcError) and "lease not found" in (cause.details() or "")
