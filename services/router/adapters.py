"""LoRA adapters at run time, cluster-wide: ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` as vLLM users know them, fanned out to the workers.

Owns the fan-out of one load or unload: the calls to every worker concerned (all
live workers of the model for a load; those that have the adapter for an unload),
the rollback of a load some worker refused (the others unload it again, so the
cluster never serves an adapter on only part of its workers because of a bad
adapter), and the wait until discovery shows the change (so a request right after
the answer finds the adapter). Stateless between calls.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from pdserve.v1 import worker_pb2

from pdserve.cluster.discovery import Discovery
from pdserve.cluster.records import WorkerRecord
from pdserve.router.errors import RequestError, invalid, unavailable
from pdserve.router.models import ModelCatalog
from pdserve.router.worker_pool import WorkerPool

_CALL_TIMEOUT = 120.0  # loading reads the adapter's weights on every worker
_VISIBLE_TIMEOUT = 10.0


class AdapterAdmin:
    def __init__(self, discovery: Discovery, catalog: ModelCatalog, pool: WorkerPool) -> None:
        self._discovery, self._catalog, self._pool = discovery, catalog, pool

    async def load(self, name: str, path: str, model: str | None) -> dict[str, Any]:
        """Load ``name`` from ``path`` on every live worker of the model; 400 if a worker refuses it."""
        base, adapter = self._catalog.resolve(model)
        if adapter is not None or name in self._catalog.adapters() or name in self._catalog.served():
            raise invalid(f"a model or adapter called {name!r} is already served", "lora_name")
        targets = [r for r in self._discovery.live() if r.model == base]
        results = await self._each(targets, "LoadAdapter", worker_pb2.LoadAdapterRequest(name=name, path=path))
        refused = {i: e for i, e in results.items() if isinstance(e, grpc.aio.AioRpcError)
                   and e.code() == grpc.StatusCode.INVALID_ARGUMENT}
        loaded = [r for r in targets if results[r.id] is None]
        if refused:
            await self._each(loaded, "UnloadAdapter", worker_pb2.UnloadAdapterRequest(name=name))
            worker, error = next(iter(refused.items()))
            raise invalid(f"adapter {name!r} was refused by worker {worker}: {error.details()}", "lora_path")
        if not loaded:
            raise unavailable(f"no worker could load adapter {name!r}: {_describe(results)}")
        await self._visible(name, {r.id for r in loaded}, present=True)
        return {"object": "lora_adapter", "lora_name": name, "parent": base, "workers": _describe(results)}

    async def unload(self, name: str) -> dict[str, Any]:
        """Unload ``name`` everywhere it is; 404 when no worker has it. Requests in flight finish with it."""
        targets = [r for r in self._discovery.live() if name in r.adapters]
        if not targets:
            raise RequestError(f"adapter {name!r} is not loaded on any worker", 404, "lora_name", "model_not_found")
        results = await self._each(targets, "UnloadAdapter", worker_pb2.UnloadAdapterRequest(name=name))
        await self._visible(name, {r.id for r in targets if results[r.id] is None}, present=False)
        return {"object": "lora_adapter", "lora_name": name, "workers": _describe(results)}

    async def _each(self, targets: list[WorkerRecord], method: str, message: Any) -> dict[str, Exception | None]:
        async def call(record: WorkerRecord) -> Exception | None:
            try:
                await getattr(self._pool.stub(record), method)(message, timeout=_CALL_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                return exc
            return None
        outcomes = await asyncio.gather(*(call(r) for r in targets))
        return {r.id: outcome for r, outcome in zip(targets, outcomes)}

    async def _visible(self, name: str, worker_ids: set[str], present: bool) -> None:
        """Wait (bounded) until discovery shows the workers with (or without) the adapter."""
        deadline = time.monotonic() + _VISIBLE_TIMEOUT
        while time.monotonic() < deadline:
            records = {r.id: r for r in self._discovery.live()}
            if all((name in records[i].adapters) == present for i in worker_ids if i in records):
                return
            await asyncio.sleep(0.05)


def _describe(results: dict[str, Exception | None]) -> dict[str, str]:
    return {worker: "ok" if error is None else f"{error.code().name}: {error.details()}"
            if isinstance(error, grpc.aio.AioRpcError) else str(error) for worker, error in results.items()}


__all__ = ["AdapterAdmin"]
