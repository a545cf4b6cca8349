"""OpenTelemetry tracing of requests across the router and the workers; off by default.

Owns one process's ``Tracing``: its tracer provider, whose OTLP gRPC exporter sends
spans in batches from a background thread, and the W3C trace context that gRPC
metadata carries from one process to the next. Torch-free, so the router uses it too.

Lifecycle: the process's owner object (``RouterProcess``, ``WorkerProcess``) makes
it once at start from its ``otlp_endpoint`` setting (``Tracing.start``) and passes
it down; its ``shutdown()`` at the end sends the spans still queued. Without an
endpoint it is ``Tracing()``: no provider, no thread; every span is the API's
non-recording ``INVALID_SPAN`` and the attribute callables are never called.

The spans of one request (process, span, what it times; attributes ``pdserve.*``):

    router   generate               arrival -> last token: model, prompt tokens, adapter,
                                    chosen decode and prefill workers; event first_token
    decode     generate             the worker's Generate stream; event first_token
    decode       queue              until the engine first scheduled it (or reserved its KV)
    decode       prefill            a prompt computed here (local prefill)
    decode       remote_prefill     one RemotePrefill order, until its KV landed here
    prefill        prefill          the prompt's compute on the prefill worker
    prefill        kv_transfer      its KV writes into the decode worker: bytes, blocks
    decode       admit              KV landed -> the first token is out

The router's span continues the trace of a client that sends a W3C ``traceparent``.

NOTE: a span is handed its parent explicitly and never made the "current" span: the
streams are async generators, where a context attached in one step could be
detached in another. The provider is this object's, never OpenTelemetry's global one.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Union
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

Attributes = Callable[[], Mapping[str, AttributeValue]]  # called only when the span records
Carrier = Union[Mapping[str, str], Iterable[tuple[str, str]]]  # HTTP headers or gRPC metadata
Parent = Union[Span, Context, None]


class Tracing:
    """The spans of one process; ``Tracing()`` is off (every call does nothing)."""

    def __init__(self, provider: "TracerProvider | None" = None) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("pdserve") if provider is not None else None
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def start(cls, endpoint: str, service: str, instance: str = "") -> "Tracing":
        """Export to the OTLP gRPC collector at ``endpoint`` (``http://`` plaintext, ``https://``
        TLS); off when it is "". The standard ``OTEL_*`` variables tune the batching
        (``OTEL_BSP_*``), the exporter (``OTEL_EXPORTER_OTLP_*``) and the sampling
        (``OTEL_TRACES_SAMPLER``: by default every trace, or as its parent decided)."""
        if not endpoint:
            return cls()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        names = {"service.name": service, **({"service.instance.id": instance} if instance else {})}
        provider = TracerProvider(resource=Resource.create(names), shutdown_on_exit=False)  # our owner shuts it down
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, parent: Parent, attributes: Attributes | None = None, start: float | None = None,
             kind: SpanKind = SpanKind.INTERNAL) -> Span:
        """A started span under ``parent`` (None: a new trace), from ``start`` (a
        ``time.monotonic()`` value) or now; end it with ``end_span``."""
        if self._tracer is None:
            return INVALID_SPAN
        return self._start(name, parent, attributes, _wall_ns(start) if start is not None else None, kind)

    def record(self, name: str, parent: Parent, start: float, end: float, attributes: Attributes | None = None,
               error: str | None = None) -> None:
        """A span that is already over: from ``start`` to ``end`` (``time.monotonic()`` values).
        Both ends take one clock offset, so the span lasts exactly ``end - start``."""
        if self._tracer is None:
            return
        offset = _wall_offset_ns()
        span = self._start(name, parent, attributes, offset + int(start * 1e9), SpanKind.INTERNAL)
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(offset + int(end * 1e9))

    def _start(self, name: str, parent: Parent, attributes: Attributes | None, start_ns: int | None,
               kind: SpanKind) -> Span:
        context = trace.set_span_in_context(parent) if isinstance(parent, Span) else parent
        return self._tracer.start_span(name, context=context if context is not None else Context(), kind=kind,
                                       attributes=attributes() if attributes is not None else None,
                                       start_time=start_ns)

    def inject(self, span: Span) -> tuple[tuple[str, str], ...] | None:
        """gRPC metadata carrying ``span``'s trace context; None when off or without a span."""
        if self._tracer is None or not span.get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, trace.set_span_in_context(span))
        return tuple(carrier.items())

    def extract(self, carrier: Carrier | None) -> Context | None:
        """The trace context in incoming gRPC metadata or HTTP headers; None when off or absent."""
        if self._tracer is None or carrier is None:
            return None
        fields = self._propagator.fields
        pairs = carrier.items() if isinstance(carrier, Mapping) else carrier
        found = {k.lower(): v for k, v in pairs if isinstance(v, str) and k.lower() in fields}
        return self._propagator.extract(found) if found else None

    def shutdown(self) -> None:
        """Send the spans still queued (bounded by the exporter's timeout), then stop; idempotent."""
        provider, self._provider = self._provider, None
        if provider is not None:
            provider.shutdown()


def end_span(span: Span, error: str | None = None, end: float | None = None,
             attributes: Attributes | None = None) -> None:
    """End ``span`` at ``end`` (a ``time.monotonic()`` value) or now, with an error status
    when ``error``; a span that is not recording (off, or already ended) is left alone."""
    if not span.is_recording():
        return
    if attributes is not None:
        span.set_attributes(attributes())
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(_wall_ns(end) if end is not None else None)


def add_event(span: Span, name: str, attributes: Attributes | None = None) -> None:
    if span.is_recording():
        span.add_event(name, attributes() if attributes is not None else None)


def set_attributes(span: Span, attributes: Attributes) -> None:
    if span.is_recording():
        span.set_attributes(attributes())


def endpoint_problem(endpoint: str) -> str | None:
    """Why ``endpoint`` is not a collector address (None when it is, or is "": tracing off)."""
    if not endpoint:
        return None
    try:
        url = urlsplit(endpoint)
        valid = url.scheme in ("http", "https") and bool(url.hostname) and url.port != 0
    except ValueError:  # .port: not a number below 65536
        valid = False
    if not valid:
        return f"{endpoint!r} is invalid: expected the OTLP gRPC collector as http://HOST:PORT or https://HOST:PORT"
    return None


def _wall_ns(monotonic: float) -> int:
    """The ``time.time_ns()`` of the moment ``time.monotonic()`` read ``monotonic``."""
    return _wall_offset_ns() + int(monotonic * 1e9)


def _wall_offset_ns() -> int:
    """``time.time_ns()`` minus ``time.monotonic_ns()`` now (two reads: can move by a few
    microseconds between calls on a busy machine)."""
    return time.time_ns() - time.monotonic_ns()
