"""The router's Prometheus metrics, in a registry of its own (no process globals).

Request outcome counters, latency histograms (time to first token, end to end),
token counters and in-flight requests are fed by the API layers through
``observe_*``; live worker counts per role are read from discovery at scrape time.
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pdserve.cluster.discovery import Discovery
from pdserve.router.request_types import Delta

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _WorkersCollector(Collector):
    def __init__(self, discovery: Discovery) -> None:
        self._discovery = discovery

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("pdserve_router_live_workers", "Live workers seen in etcd", labels=["role"])
        for role in ("hybrid", "prefill", "decode"):
            family.add_metric([role], len(self._discovery.live(role)))
        yield family


class RouterMetrics:
    def __init__(self, discovery: Discovery) -> None:
        self.registry = reg = CollectorRegistry()
        reg.register(_WorkersCollector(discovery))
        self.requests = Counter("pdserve_router_requests", "Finished requests", ["api", "outcome"], registry=reg)
        self.inflight = Gauge("pdserve_router_inflight_requests", "Requests being served", ["api"], registry=reg)
        self.ttft = Histogram("pdserve_router_time_to_first_token_seconds", "Receipt to first token",
                              buckets=BUCKETS, registry=reg)
        self.e2e = Histogram("pdserve_router_request_seconds", "Receipt to last token", buckets=BUCKETS, registry=reg)
        self.prompt_tokens = Counter("pdserve_router_prompt_tokens", "Prompt tokens routed", registry=reg)
        self.generated_tokens = Counter("pdserve_router_generated_tokens", "Tokens streamed back", registry=reg)

    def observe_final(self, api: str, delta: Delta) -> None:
        """Record a finished request from its last delta."""
        self.requests.labels(api, delta.finish_reason or "unknown").inc()
        if delta.timing is not None:
            self.ttft.observe(delta.timing.time_to_first_token)
            self.e2e.observe(delta.timing.total)
        if delta.usage is not None:
            self.prompt_tokens.inc(delta.usage.prompt_tokens)
            self.generated_tokens.inc(delta.usage.completion_tokens)

    def observe_error(self, api: str, code: str) -> None:
        self.requests.labels(api, f"error:{code}").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
