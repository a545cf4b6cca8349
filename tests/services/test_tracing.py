"""OpenTelemetry tracing: the helper module (off by default, W3C context through gRPC
metadata and HTTP headers, spans timed from monotonic clocks, flushed on shutdown) and
one request through a real 1P1D cluster (etcd, router, prefill and decode workers,
NIXL) exporting to an OTLP gRPC collector run by the test: one trace across the three
processes, the span tree as designed, and child spans inside their parents."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Iterator

import grpc
import pytest
from multidict import CIMultiDict
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN
from pdserve.v1 import router_pb2

from pdserve.common.tracing import Tracing, add_event, end_span, set_attributes
from pdserve.engine.config import ConfigError
from pdserve.router.config import RouterConfig, RouterConfigError
from pdserve.router.cli import build_parser as router_parser
from pdserve.worker.cli import build_parser as worker_parser
from pdserve.worker.config import build_worker_config
from tests.services.clients import http_json, router_stub, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOLERANCE_NS = 2_000_000  # clocks are read at slightly different moments in different calls


# ---- an OTLP gRPC collector in the test -------------------------------------------------
@dataclass(frozen=True)
class Exported:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start: int
    end: int
    attributes: dict[str, Any]
    events: tuple[str, ...]
    error: bool


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it (``TraceService/Export``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[Exported] = []
        self.endpoint = ""

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any):
        with self._lock:
            self._spans.extend(_parse(request))
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[Exported]:
        with self._lock:
            return list(self._spans)


def _parse(request: trace_service_pb2.ExportTraceServiceRequest) -> Iterator[Exported]:
    for resource_spans in request.resource_spans:
        service = _attributes(resource_spans.resource.attributes).get("service.name", "")
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                yield Exported(service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                               s.start_time_unix_nano, s.end_time_unix_nano, _attributes(s.attributes),
                               tuple(e.name for e in s.events), s.status.code == s.status.STATUS_CODE_ERROR)


def _attributes(pairs: Any) -> dict[str, Any]:
    def value(v: Any) -> Any:
        kind = v.WhichOneof("value")
        return [value(x) for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
    return {kv.key: value(kv.value) for kv in pairs}


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    sink = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    sink.endpoint = f"http://127.0.0.1:{port}"
    try:
        yield sink
    finally:
        server.stop(0)


def in_memory() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


# ---- the helper module -------------------------------------------------------------------
def test_off_by_default_is_a_no_op() -> None:
    def never() -> dict:
        raise AssertionError("attributes built while tracing is off")

    for tracing in (Tracing(), Tracing.start("", "pdserve-test")):
        assert not tracing.enabled
        span = tracing.span("generate", None, never, time.monotonic())
        assert span is INVALID_SPAN and not span.is_recording()
        tracing.record("queue", span, 1.0, 2.0, never, "error")
        add_event(span, "first_token", never)
        set_attributes(span, never)
        end_span(span, "error", attributes=never)
        assert tracing.inject(span) is None
        assert tracing.extract((("traceparent", f"00-{'1' * 32}-{'2' * 16}-01"),)) is None
        tracing.shutdown()
    router = RouterConfig.build(vars(router_parser().parse_args(["--etcd", "http://e:1"])), {})
    worker = build_worker_config({"etcd": "http://e:1"}, {})
    assert router.otlp_endpoint == "" and worker.otlp_endpoint == ""


def test_endpoint_from_flags_or_environment_and_checked() -> None:
    flags = vars(router_parser().parse_args(["--etcd", "http://e:1", "--otlp-endpoint", "http://otel:4317"]))
    assert RouterConfig.build(flags, {}).otlp_endpoint == "http://otel:4317"
    env = {"PDSERVE_ROUTER_ETCD": "http://e:1", "PDSERVE_ROUTER_OTLP_ENDPOINT": "https://otel.example:4317"}
    assert RouterConfig.build({}, env).otlp_endpoint == "https://otel.example:4317"
    assert worker_parser().parse_args(["--otlp-endpoint", "http://otel:4317"]).otlp_endpoint == "http://otel:4317"
    env = {"PDSERVE_ETCD": "http://e:1", "PDSERVE_OTLP_ENDPOINT": "http://otel:4317"}
    assert build_worker_config({}, env).otlp_endpoint == "http://otel:4317"
    with pytest.raises(RouterConfigError, match="otlp_endpoint='otel:4317' is invalid"):
        RouterConfig.build({"etcd": "http://e:1", "otlp_endpoint": "otel:4317"}, {})
    with pytest.raises(ConfigError, match="otlp_endpoint='grpc://otel' is invalid"):
        build_worker_config({"etcd": "http://e:1", "otlp_endpoint": "grpc://otel"}, {})


def test_context_round_trip_through_metadata_and_headers() -> None:
    sender, sent = in_memory()
    receiver, received = in_memory()
    parent = sender.span("remote_prefill", None)
    metadata = sender.inject(parent)
    assert metadata is not None and dict(metadata)["traceparent"].startswith("00-")
    headers = CIMultiDict({"Traceparent": dict(metadata)["traceparent"], "Authorization": "Bearer x"})
    for carrier in (metadata, grpc.aio.Metadata(*metadata, ("x-other", "1")), headers):
        end_span(receiver.span("prefill", receiver.extract(carrier)))
    end_span(parent)
    (p,) = sent.get_finished_spans()
    children = received.get_finished_spans()
    assert len(children) == 3
    for child in children:
        assert child.context.trace_id == p.context.trace_id and child.parent.span_id == p.context.span_id
        assert child.parent.is_remote
    assert receiver.extract((("authorization", "Bearer x"),)) is None  # nothing to continue: a new trace


def test_spans_timed_from_monotonic_values() -> None:
    tracing, exporter = in_memory()
    parent = tracing.span("generate", None, lambda: {"pdserve.prompt_tokens": 3})
    start = time.monotonic()
    tracing.record("queue", parent, start, start + 0.25, error="late")
    end_span(parent, attributes=lambda: {"pdserve.finish_reason": "length"})
    end_span(parent, "ignored: already ended")
    queue, generate = exporter.get_finished_spans()
    assert queue.end_time - queue.start_time == pytest.approx(250_000_000, abs=1000)
    assert abs(queue.start_time - time.time_ns()) < 1_000_000_000
    assert queue.parent.span_id == generate.context.span_id and not queue.status.is_ok
    assert generate.attributes == {"pdserve.prompt_tokens": 3, "pdserve.finish_reason": "length"}
    assert generate.status.is_unset


def test_shutdown_sends_what_is_queued(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # only the shutdown flush can send it
    tracing = Tracing.start(collector.endpoint, "pdserve-test", "w-1")
    assert tracing.enabled
    end_span(tracing.span("generate", None, lambda: {"pdserve.request_id": "r-1"}))
    assert not collector.spans()
    tracing.shutdown()
    tracing.shutdown()
    (span,) = collector.spans()
    assert (span.service, span.name, span.attributes) == ("pdserve-test", "generate", {"pdserve.request_id": "r-1"})


def test_router_with_tracing_on_imports_no_torch() -> None:
    code = "\n".join([
        "import sys",
        "from pdserve.router.app import RouterProcess",
        "from pdserve.router.config import RouterConfig",
        "router = RouterProcess(RouterConfig(etcd='http://127.0.0.1:1', otlp_endpoint='http://127.0.0.1:1'), print)",
        "assert router.tracing.enabled",
        "router.tracing.shutdown()",
        "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'pdserve.engine')))",
        "assert not heavy, heavy",
    ])
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ---- one request through a real 1P1D cluster ----------------------------------------------
PROMPT = list(range(300, 360))  # above the local-prefill threshold (32): computed on the prefill worker
EXPECTED = {("pdserve-router", "generate"), ("pdserve-decode", "generate"), ("pdserve-decode", "queue"),
            ("pdserve-decode", "remote_prefill"), ("pdserve-prefill", "prefill"),
            ("pdserve-prefill", "kv_transfer"), ("pdserve-decode", "admit")}


@pytest.mark.timeout(180)
def test_one_trace_across_router_decode_and_prefill(collector: Collector, tmp_path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.engine.conftest import make_tiny_model
    from tests.services.cluster_fixture import local_cluster

    model = make_tiny_model("llama", str(tmp_path))
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    tracing = ("--otlp-endpoint", collector.endpoint)
    with local_cluster(hybrid=0, prefill=1, decode=1, model=model, log_dir=str(tmp_path / "logs"),
                       worker_args=tracing, router_args=tracing) as cluster:
        status, body = http_json(f"{cluster.http_url}/v1/completions",
                                 {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert status == 200, body
        spans = wait_for(lambda: _one_trace(collector.spans()), 20.0, what="the request's spans")

        # a client's own trace context continues into the router (gRPC API)
        client_trace, client_span = "ab" * 16, "cd" * 8
        request = router_pb2.GenerateRequest(model=model, token_ids=router_pb2.TokenIds(ids=PROMPT[:8]))
        request.params.max_tokens = 2
        replies = list(router_stub(cluster.grpc_address).Generate(
            request, metadata=(("traceparent", f"00-{client_trace}-{client_span}-01"),), timeout=60))
        assert replies[-1].finish_reason
        continued = wait_for(lambda: _of_trace(collector.spans(), client_trace), 20.0,
                             what="the spans of the client's trace")

    by_name = {(s.service, s.name): s for s in spans}
    router, worker = by_name["pdserve-router", "generate"], by_name["pdserve-decode", "generate"]
    remote = by_name["pdserve-decode", "remote_prefill"]
    assert router.parent_id == ""  # the root
    assert worker.parent_id == router.span_id
    for name in ("queue", "remote_prefill", "admit"):
        assert by_name["pdserve-decode", name].parent_id == worker.span_id, name
    for name in ("prefill", "kv_transfer"):
        assert by_name["pdserve-prefill", name].parent_id == remote.span_id, name

    _inside(worker, router)
    for key in EXPECTED - {("pdserve-router", "generate"), ("pdserve-decode", "generate")}:
        _inside(by_name[key], remote if key[0] == "pdserve-prefill" else worker)
    queue, admit = by_name["pdserve-decode", "queue"], by_name["pdserve-decode", "admit"]
    assert queue.end <= remote.start + TOLERANCE_NS and remote.end <= admit.start + TOLERANCE_NS

    decode_id, prefill_id = router.attributes["pdserve.decode_worker"], router.attributes["pdserve.prefill_workers"]
    assert router.attributes["pdserve.model"] == model and router.attributes["pdserve.prompt_tokens"] == len(PROMPT)
    assert router.attributes["pdserve.adapter"] == "" and decode_id.startswith("decode-")
    assert len(prefill_id) == 1 and prefill_id[0].startswith("prefill-")
    assert "first_token" in router.events and "first_token" in worker.events
    assert worker.attributes["pdserve.worker_id"] == decode_id
    assert remote.attributes["pdserve.prefill_worker"] == prefill_id[0]
    transfer = by_name["pdserve-prefill", "kv_transfer"]
    assert transfer.attributes["pdserve.kv.bytes"] > 0 and transfer.attributes["pdserve.kv.blocks"] > 0
    assert not any(s.error for s in spans)

    (client_child,) = [s for s in continued if s.service == "pdserve-router"]
    assert client_child.parent_id == client_span
    assert {s.name for s in continued if s.service == "pdserve-decode"} >= {"generate", "queue", "prefill"}


def _one_trace(spans: list[Exported]) -> list[Exported] | None:
    """The spans of the first request once all of them arrived; every one shares its trace id."""
    roots = [s for s in spans if (s.service, s.name) == ("pdserve-router", "generate") and not s.parent_id]
    if not roots:
        return None
    mine = [s for s in spans if s.trace_id == roots[0].trace_id]
    found = {(s.service, s.name) for s in mine}
    if not EXPECTED <= found:
        return None
    assert len(mine) == len(EXPECTED), sorted((s.service, s.name) for s in mine)
    assert len(spans) == len(mine), "spans outside the request's trace"
    return mine


def _of_trace(spans: list[Exported], trace_id: str) -> list[Exported] | None:
    """The spans of ``trace_id`` once the router's and the decode worker's ``generate`` arrived."""
    mine = [s for s in spans if s.trace_id == trace_id]
    found = {(s.service, s.name) for s in mine}
    return mine if {("pdserve-router", "generate"), ("pdserve-decode", "generate")} <= found else None


def _inside(child: Exported, parent: Exported) -> None:
    assert parent.start - TOLERANCE_NS <= child.start <= child.end <= parent.end + TOLERANCE_NS, (child, parent)
