"""``RouterCore``: what both APIs (gRPC and HTTP) share, wired once by ``app``.

Owns nothing with a lifecycle of its own; it bundles discovery (live workers),
the model catalog (tokenizers, limits), the worker pool + policies, the
dispatcher and the metrics, and offers the few calls the API layers need.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

from pdserve.cluster.discovery import Discovery
from pdserve.cluster.records import WorkerRecord, kv_mismatch
from pdserve.common.roles import kv_pair
from pdserve.common.tracing import Carrier
from pdserve.router.adapters import AdapterAdmin
from pdserve.router.dispatch import Dispatcher
from pdserve.router.errors import RequestError
from pdserve.router.metrics import RouterMetrics
from pdserve.router.models import ModelCatalog
from pdserve.router.prepare import MaxTokensPolicy, prepare
from pdserve.router.request_types import Delta, GenerationRequest, Prompt
from pdserve.router.worker_pool import WorkerPool


@dataclass
class RouterCore:
    discovery: Discovery
    catalog: ModelCatalog
    pool: WorkerPool
    dispatcher: Dispatcher
    metrics: RouterMetrics
    max_tokens: MaxTokensPolicy = MaxTokensPolicy()
    max_inflight: int = 0  # 0 = no bound
    inflight: int = 0

    @functools.cached_property
    def adapters(self) -> AdapterAdmin:
        return AdapterAdmin(self.discovery, self.catalog, self.pool)

    async def prepare(self, request_id: str, model: str | None, prompt: Prompt, values: dict[str, Any],
                      arrival: float, default_max_tokens: int | None) -> tuple[GenerationRequest, Any]:
        return await prepare(self.catalog, request_id, model, prompt, values, arrival, default_max_tokens,
                             self.max_tokens)

    def dispatch(self, req: GenerationRequest, tokenizer: Any, carrier: Carrier | None = None) -> AsyncIterator[Delta]:
        """``carrier``: the client's HTTP headers or gRPC metadata (a trace context it may carry)."""
        return self.dispatcher.stream(req, tokenizer, carrier)

    def health(self) -> tuple[str, int, dict[str, str]]:
        """(status, live workers, problems): "SERVING", "NO_WORKERS", or "UNHEALTHY" when a
        served model's tokenizer failed to load (problems names each model and the cause)."""
        workers, problems = len(self.discovery.live()), self.catalog.problems()
        status = "UNHEALTHY" if problems else ("SERVING" if workers else "NO_WORKERS")
        return status, workers, problems

    @contextlib.contextmanager
    def tracking(self, api: str) -> Iterator[None]:
        """Count one request being served; ``RequestError`` 429 when ``max_inflight`` are."""
        if self.max_inflight and self.inflight >= self.max_inflight:
            raise RequestError(f"the router is serving its limit of {self.max_inflight} requests at once; "
                               f"retry in a moment", 429, None, "too_many_requests")
        gauge = self.metrics.inflight.labels(api)
        gauge.inc()
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            gauge.dec()

    def workers_json(self) -> list[dict[str, Any]]:
        """Every live worker with its address and latest load (``GET /workers``, ``ListWorkers``)."""
        live = self.discovery.live()
        return [{"id": r.id, "role": r.role, "model": r.model, "quantization": r.quantization,
                 "grpc_address": r.grpc_address,
                 "metrics_url": r.metrics_url, "load": self.discovery.load(r.id).public(),
                 "router_inflight": self.pool.inflight(r.id), "kv_agent": r.kv_agent,
                 "kv_incompatible": _kv_problems(r, live)}
                for r in live]


def _kv_problems(record: WorkerRecord, live: list[WorkerRecord]) -> list[str]:
    """Why ``record`` refuses to pair with each P/D peer of the same model, if any."""
    out = []
    for other in live:
        if other.id != record.id and other.model == record.model and kv_pair(record.role, other.role):
            problem = kv_mismatch(record, other)
            if problem is not None:
                out.append(problem)
    return out
