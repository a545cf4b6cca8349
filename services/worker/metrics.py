"""The worker's Prometheus metrics and the small HTTP server that exposes them.

Owns one ``CollectorRegistry`` per worker (no process globals): engine gauges are
read from ``engine.stats()`` at scrape time; request counters and histograms are
fed by the servicer; the step-time histogram is fed by ``observe_engine()``, which
the worker calls about once a second.

Two families: ``pdserve_worker_*`` / ``pdserve_kv_*`` (labels worker_id, role,
model) and the vLLM-style ``pdserve:*`` request metrics (``ServingMetrics``; labels
model_name, worker_id, role) that dashboards built for vLLM chart. Each Generate
stream feeds the latter through one ``RequestTrace``: accepted (arrival) -> first
scheduled (the engine's first step with it; for a prompt a prefill worker computes,
the reservation of its KV blocks, right before the order is sent) -> first token ->
later tokens -> ``close()`` when the stream ends. So queue = arrival -> scheduled,
prefill = scheduled -> first token (a remote prefill: order sent -> first token
back), decode = first token -> end, and queue + prefill = time to first token.

Lifecycle of ``MetricsServer``: ``start()`` binds ``host:port`` (0 = any free port)
and serves ``GET /metrics`` and ``GET /health`` -> ``stop()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TRANSFER_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BANDWIDTH_BUCKETS = (1e7, 3e7, 1e8, 3e8, 1e9, 3e9, 1e10, 3e10, 1e11, 3e11, 1e12)

# Buckets of the ``pdserve:*`` histograms, after vLLM's, so quantiles read alike on dashboards made for it.
# Time to first token: 1 ms .. 640 s, fine below 100 ms where a short prompt's first token lands.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
# Inter-token latency: 10 ms .. 80 s as vLLM's, plus 1 and 5 ms (small models on a GPU decode faster).
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
# End-to-end and decode time: the request-latency series, 0.3 s .. about 2 h.
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
# Queue and prefill time: vLLM uses the request-latency series, whose first bucket (0.3 s) would hide
# an idle worker's millisecond queue; these start at 1 ms and end like it.
PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                 480.0, 1920.0, 7680.0)
# Tokens per request: the 1-2-5 series vLLM builds up to the context length, here up to 1M for every
# worker, so workers serving different context lengths aggregate into the same buckets.
TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5)) + (1_000_000,)


class _StatsCollector(Collector):
    """Metric families computed from ``engine.stats()`` each time the registry is scraped."""

    def __init__(self, stats: Callable[[], dict[str, Any]], labels: dict[str, str]) -> None:
        self._stats = stats
        self._labels = labels

    def collect(self) -> Iterator:
        return self.families(self._stats(), list(self._labels), list(self._labels.values()))

    def families(self, s: dict[str, Any], names: list[str], values: list[str]) -> Iterator:
        raise NotImplementedError


class _EngineCollector(_StatsCollector):
    """The worker's gauges and counters (``pdserve_worker_*``)."""

    def families(self, s: dict[str, Any], names: list[str], values: list[str]) -> Iterator:
        yield _gauge("pdserve_worker_requests_running", "Requests in the running batch", names, values, s["running"])
        yield _gauge("pdserve_worker_queue_depth", "Requests waiting to be scheduled", names, values, s["waiting"])
        blocks = GaugeMetricFamily("pdserve_worker_kv_blocks", "KV cache blocks by state", labels=names + ["state"])
        for state in ("used", "free", "cached", "total"):
            blocks.add_metric(values + [state], s[f"kv_blocks_{state}"])
        yield blocks
        tokens = CounterMetricFamily("pdserve_worker_tokens_computed", "Tokens computed by the model", labels=names)
        tokens.add_metric(values, s["tokens_computed_total"])
        yield tokens
        steps = CounterMetricFamily("pdserve_worker_engine_steps", "Engine steps executed", labels=names)
        steps.add_metric(values, s["steps_total"])
        yield steps
        yield _gauge("pdserve_worker_lora_adapters_loaded", "LoRA adapters loaded (new requests may use them)",
                     names, values, s.get("lora_adapters_loaded", 0))
        yield _gauge("pdserve_worker_lora_adapters_resident", "LoRA adapters in device slots now (max_loras)",
                     names, values, len(s.get("lora_resident", ())))
        swaps = CounterMetricFamily("pdserve_worker_lora_swaps", "LoRA adapters copied from host memory into a "
                                    "device slot (max_loras slots, max_cpu_loras adapters)", labels=names)
        swaps.add_metric(values, s.get("lora_swaps_total", 0))
        yield swaps
        yield from _rank_families(s.get("rank_seconds", ()), names, values)


def _rank_families(ranks: Any, names: list[str], values: list[str]) -> Iterator:
    """Per-rank step and collective seconds (tensor-parallel workers); the collectives'
    share of a rank's time is the ratio of their rates."""
    if not ranks:
        return
    step = CounterMetricFamily("pdserve_worker_rank_step_seconds", "Seconds each rank spent in engine steps",
                               labels=names + ["rank"])
    comm = CounterMetricFamily("pdserve_worker_rank_collective_seconds",
                               "Seconds each rank spent in tensor-parallel collectives (part of its step seconds)",
                               labels=names + ["rank"])
    for rank, (step_s, comm_s) in enumerate(ranks):
        step.add_metric(values + [str(rank)], step_s)
        comm.add_metric(values + [str(rank)], comm_s)
    yield step
    yield comm


class _ServingCollector(_StatsCollector):
    """The ``pdserve:*`` gauges."""

    def families(self, s: dict[str, Any], names: list[str], values: list[str]) -> Iterator:
        total = s["kv_blocks_total"]
        yield _gauge("pdserve:num_requests_running", "Requests in the engine's running batch", names, values,
                     s["running"])
        yield _gauge("pdserve:num_requests_waiting", "Requests waiting to be scheduled", names, values, s["waiting"])
        yield _gauge("pdserve:kv_cache_usage_perc", "Share of KV-cache blocks in use (0..1; free prefix-cached "
                     "blocks count as free)", names, values, s["kv_blocks_used"] / total if total else 0.0)


def _gauge(name: str, doc: str, names: list[str], values: list[str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=names)
    family.add_metric(values, value)
    return family


class ServingMetrics:
    """The vLLM-style ``pdserve:*`` request metrics of one worker (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, stats: Callable[[], dict[str, Any]],
                 labels: dict[str, str]) -> None:
        registry.register(_ServingCollector(stats, labels))
        self._labels = labels
        names = list(labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, names, buckets=buckets, registry=registry).labels(**labels)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, names, registry=registry).labels(**labels)

        self.ttft = histogram("pdserve:time_to_first_token_seconds", "Stream accepted to its first token",
                              TTFT_BUCKETS)
        self.tpot = histogram("pdserve:time_per_output_token_seconds", "Inter-token latency of each token after "
                              "the first, as streamed (tokens that come in one message share its gap)", TPOT_BUCKETS)
        self.e2e = histogram("pdserve:e2e_request_latency_seconds", "Stream accepted to its end",
                             REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("pdserve:request_queue_time_seconds", "Stream accepted to first scheduled (remote "
                               "prefill: to its KV blocks reserved, before the order is sent)", PHASE_BUCKETS)
        self.prefill = histogram("pdserve:request_prefill_time_seconds", "First scheduled (or prefill order sent) "
                                 "to the first token", PHASE_BUCKETS)
        self.decode = histogram("pdserve:request_decode_time_seconds", "First token to the end of the stream",
                                REQUEST_LATENCY_BUCKETS)
        self.prompt_hist = histogram("pdserve:request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS)
        self.generation_hist = histogram("pdserve:request_generation_tokens", "Generated tokens per request",
                                         TOKEN_BUCKETS)
        self.prompt_tokens = counter("pdserve:prompt_tokens", "Prompt tokens of requests that got a first token")
        self.generation_tokens = counter("pdserve:generation_tokens", "Tokens generated")
        self.success = Counter("pdserve:request_success", "Finished requests by the engine's finish reason (stop, "
                               "length, abort, error)", names + ["finished_reason"], registry=registry)

    def trace(self, arrival: float, prompt_tokens: int) -> "RequestTrace":
        """A new stream, accepted at ``arrival`` (``time.monotonic()``)."""
        return RequestTrace(self, arrival, prompt_tokens)

    def count_finished(self, reason: str) -> None:
        self.success.labels(**self._labels, finished_reason=reason).inc()


@dataclass
class RequestTrace:
    """One Generate stream's timeline (``time.monotonic()`` seconds), observed as it goes.

    Lifecycle: ``ServingMetrics.trace()`` when the stream is accepted -> ``output()``
    for each message -> ``close()`` once when it ends (set ``finish_reason`` first,
    or ``refused`` when the engine turned the request down: then nothing is observed).
    """

    metrics: ServingMetrics
    arrival: float
    prompt_tokens: int
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    generation_tokens: int = 0
    finish_reason: str = "abort"
    refused: bool = False

    def output(self, now: float, num_new: int, scheduled: float | None) -> None:
        if self.scheduled is None:
            self.scheduled = scheduled
        if not num_new:
            return
        m = self.metrics
        if self.first_token is None:
            self.first_token = now
            m.ttft.observe(now - self.arrival)
            m.prompt_tokens.inc(self.prompt_tokens)
            gaps = [0.0] * (num_new - 1)  # NOTE: delivered with the first token
        else:
            gaps = [(now - self.last_token) / num_new] * num_new
        for gap in gaps:
            m.tpot.observe(gap)
        self.last_token = now
        self.generation_tokens += num_new
        m.generation_tokens.inc(num_new)

    def close(self, now: float) -> None:
        if self.refused:
            return
        m = self.metrics
        m.e2e.observe(now - self.arrival)
        if self.scheduled is not None:
            m.queue.observe(max(self.scheduled - self.arrival, 0.0))
            if self.first_token is not None:
                m.prefill.observe(max(self.first_token - self.scheduled, 0.0))
        if self.first_token is not None:
            m.decode.observe(now - self.first_token)
        m.prompt_hist.observe(self.prompt_tokens)
        m.generation_hist.observe(self.generation_tokens)
        m.count_finished(self.finish_reason)


class WorkerMetrics:
    """Every metric of one worker, in its own registry."""

    def __init__(self, stats: Callable[[], dict[str, Any]], worker_id: str, role: str, model: str) -> None:
        labels = {"worker_id": worker_id, "role": role, "model": model}
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, labels))
        self.serving = ServingMetrics(self.registry, stats, {"model_name": model, "worker_id": worker_id,
                                                             "role": role})
        names, reg = list(labels), self.registry
        self.requests = Counter("pdserve_worker_requests", "Finished Generate streams by finish reason",
                                names + ["finish_reason"], registry=reg)
        self.prompt_tokens = Counter("pdserve_worker_prompt_tokens", "Prompt tokens received", names, registry=reg)
        self.cached_tokens = Counter("pdserve_worker_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     names, registry=reg)
        self.generated_tokens = Counter("pdserve_worker_generated_tokens", "Tokens generated", names, registry=reg)
        self.first_token = Histogram("pdserve_worker_time_to_first_token_seconds",
                                     "Accept to first token (queue + prefill)", names, buckets=LATENCY_BUCKETS, registry=reg)
        self.step_time = Histogram("pdserve_worker_step_seconds", "Engine step duration (sampled about once a second)",
                                   names, buckets=LATENCY_BUCKETS, registry=reg)
        self.inflight = Gauge("pdserve_worker_inflight_streams", "Open Generate streams", names, registry=reg)
        self.draining = Gauge("pdserve_worker_draining", "1 while the worker drains", names, registry=reg)
        self.adapter_requests = Counter("pdserve_worker_lora_requests", "Generate streams by LoRA adapter",
                                        names + ["adapter"], registry=reg)
        self._add_disagg_metrics(names, reg)
        self._labels = labels
        self._last_steps = 0

    def _add_disagg_metrics(self, names: list[str], reg: CollectorRegistry) -> None:
        direction = names + ["direction"]
        self.kv_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes moved between workers (sent by prefill, "
                                "received by decode)", direction, registry=reg)
        self.kv_blocks = Counter("pdserve_kv_transfer_blocks", "KV blocks moved between workers (a block counts "
                                 "once for all its layers)", direction, registry=reg)
        self.kv_seconds = Histogram("pdserve_kv_transfer_seconds", "First KV write posted to every write DONE",
                                    direction, buckets=TRANSFER_BUCKETS, registry=reg)
        self.kv_tail = Histogram("pdserve_kv_transfer_tail_seconds", "Last layer computed to every KV write DONE "
                                 "(the transfer time not hidden behind compute)", names, buckets=TRANSFER_BUCKETS,
                                 registry=reg)
        self.kv_bandwidth = Histogram("pdserve_kv_transfer_bandwidth_bytes_per_second", "Bytes over the time spent "
                                      "writing them, per request", direction, buckets=BANDWIDTH_BUCKETS, registry=reg)
        self.kv_handover = Histogram("pdserve_kv_handover_seconds", "Prefill side: last layer computed to completion "
                                     "notification sent", names, buckets=TRANSFER_BUCKETS, registry=reg)
        self.remote_compute = Histogram("pdserve_worker_remote_prefill_compute_seconds", "Prefill side: "
                                        "RemotePrefill accepted to its last layer computed (queue + compute)", names,
                                        registry=reg)
        self.prefills = Counter("pdserve_worker_prefills", "Prompts prefilled for this worker's requests: where "
                                "(local | remote) and why", names + ["where", "reason"], registry=reg)
        self.remote_prefills = Counter("pdserve_worker_remote_prefill_requests", "RemotePrefill calls served "
                                       "(prefill side) by status and the phase an abort or failure found",
                                       names + ["status", "phase"], registry=reg)
        self.remote_prefill_latency = Histogram("pdserve_worker_remote_prefill_seconds", "Decode side: RemotePrefill "
                                                "sent to KV landed (queue + compute + transfer)", names,
                                                buckets=LATENCY_BUCKETS, registry=reg)

    def count_prefill(self, where: str, reason: str) -> None:
        self.labelled(self.prefills, where=where, reason=reason).inc()

    def observe_kv(self, direction: str, blocks: int, nbytes: int) -> None:
        self.labelled(self.kv_blocks, direction=direction).inc(blocks)
        self.labelled(self.kv_bytes, direction=direction).inc(nbytes)

    def observe_transfer_time(self, direction: str, nbytes: int, seconds: float, write_seconds: float) -> None:
        self.labelled(self.kv_seconds, direction=direction).observe(seconds)
        if write_seconds > 0:
            self.labelled(self.kv_bandwidth, direction=direction).observe(nbytes / write_seconds)

    def observe_remote_prefill_latency(self, seconds: float) -> None:
        """Decode side: one RemotePrefill call, from sending it to the KV having landed."""
        self.labelled(self.remote_prefill_latency).observe(seconds)

    def observe_remote_prefill(self, result: Any) -> None:
        """Prefill side: one answered RemotePrefill (``pdserve.prefill.server.PrefillResult``)."""
        self.labelled(self.remote_prefills, status=result.status, phase=result.phase or "-").inc()
        if result.status == "DONE":
            self.observe_kv("sent", result.blocks_sent, result.bytes_sent)
            self.observe_transfer_time("sent", result.bytes_sent, result.transfer_seconds, result.write_seconds)
            self.labelled(self.kv_tail).observe(result.tail_seconds)
            self.labelled(self.kv_handover).observe(result.handover_seconds)
            self.labelled(self.remote_compute).observe(result.compute_seconds)

    def labelled(self, metric: Any, **extra: str) -> Any:
        return metric.labels(**self._labels, **extra)

    def observe_engine(self, stats: dict[str, Any]) -> None:
        """Sample the step histogram: one observation of the last step when steps advanced.

        NOTE: the engine reports only its last step's duration, so this is a sample
        (about one step per second), not every step.
        """
        if stats["steps_total"] > self._last_steps:
            self._last_steps = stats["steps_total"]
            self.labelled(self.step_time).observe(stats["last_step_seconds"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def _health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class MetricsServer:
    """``GET /metrics`` (Prometheus text) and ``GET /health`` over HTTP."""

    def __init__(self, metrics: WorkerMetrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/health", _health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve_metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
