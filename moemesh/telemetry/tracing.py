"""Tracing: one `Telemetry` per process, built by its main.py and passed down (no global tracer provider).

One trace per request. The gateway opens the root span (`gateway.generate`); its W3C `traceparent` travels in
`DecodeRequest.traceparent` (a Session stream carries many requests, so not in the stream's metadata), D's in
the Prefill call's metadata and in `KvTarget.traceparent`, and each process adds its spans under it. Spans
are aggregated per phase (names in `spans.py`), never one per token.

Where finished spans go (`Telemetry.create`):
* a `SpanStore` holding the last `trace_buffer` traces in memory: the gateway's built-in trace view gathers a
  request's spans from every worker's store (`Spans.GetSpans`);
* an OTLP/gRPC exporter (batched, in OpenTelemetry's background thread) when an endpoint is configured.
With neither, `Telemetry.disabled()`: every call returns at once and nothing is recorded.

Span handles are OpenTelemetry's `Span`; `Parent` is what a span may hang under: a span, a `traceparent`
string from the wire, or None (the current span of this task, else a new trace).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from moemesh.telemetry import logs
from moemesh.telemetry.spans import WORKER, SpanRecord

Parent = Span | str | None
_PROPAGATOR = TraceContextTextMapPropagator()  # stateless: W3C traceparent in and out
EXPORT_DELAY_MS = 500  # how long finished spans wait before a batch goes to the collector
EXPORT_TIMEOUT_S = 3.0  # one batch's export, retries included (a collector that is down costs this much)
SHUTDOWN_TIMEOUT_S = EXPORT_TIMEOUT_S + 1.0  # what a stopping process gives the exporter's last batch


class SpanStore(SpanProcessor):
    """The last `max_traces` traces' finished spans of this process, by trace id (thread-safe: spans end on
    the event loop and on OpenTelemetry's threads)."""

    def __init__(self, worker: str, max_traces: int) -> None:
        self.worker = worker
        self.max_traces = max_traces
        self._traces: OrderedDict[str, list[SpanRecord]] = OrderedDict()
        self._lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
        record = to_record(span, self.worker)
        with self._lock:
            self._traces.setdefault(record.trace_id, []).append(record)
            self._traces.move_to_end(record.trace_id)
            while len(self._traces) > self.max_traces:
                self._traces.popitem(last=False)

    def spans(self, trace_ids: Iterable[str]) -> list[SpanRecord]:
        with self._lock:
            return [s for t in trace_ids for s in self._traces.get(t, ())]

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def to_record(span: ReadableSpan, worker: str) -> SpanRecord:
    parent = span.parent.span_id if span.parent is not None else 0
    attributes = {k: v if not isinstance(v, tuple) else list(v) for k, v in (span.attributes or {}).items()}
    return SpanRecord(
        span.name, worker, f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}",
        f"{parent:016x}" if parent else "", span.start_time or 0, span.end_time or 0, attributes,
        span.status.status_code == StatusCode.ERROR,
    )  # fmt: skip


def attributes_json(record: SpanRecord) -> str:
    return json.dumps(record.attributes, default=str)


class Telemetry:
    """This process's tracer. `worker` names the process in spans and logs ("gateway", "decode-0", ...)."""

    def __init__(
        self,
        worker: str,
        provider: TracerProvider | None = None,
        store: SpanStore | None = None,
    ) -> None:
        self.worker = worker
        self.provider = provider
        self.store = store
        self.enabled = provider is not None
        self._tracer = provider.get_tracer("moemesh") if provider is not None else trace.NoOpTracer()

    @classmethod
    def create(
        cls, service: str, worker: str, *, otlp_endpoint: str = "", trace_buffer: int = 0
    ) -> Telemetry:
        """service: the OpenTelemetry service.name ("moemesh-gateway", ...); otlp_endpoint and trace_buffer as
        in `TelemetryConfig` (main.py passes them: telemetry imports nothing of ours)."""
        if not otlp_endpoint and trace_buffer <= 0:
            return cls.disabled(worker)
        resource = Resource.create({"service.name": service, "service.instance.id": worker, WORKER: worker})
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # shutdown() is bounded
        store = None
        if trace_buffer > 0:
            store = SpanStore(worker, trace_buffer)
            provider.add_span_processor(store)
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            secure = otlp_endpoint.startswith("https://")
            exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=not secure, timeout=EXPORT_TIMEOUT_S)
            provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS))
        return cls(worker, provider, store)

    @classmethod
    def disabled(cls, worker: str = "") -> Telemetry:
        return cls(worker)

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Sends the spans still batched and stops the exporter, giving up after `timeout_s` (an unreachable
        collector must not hold a stopping process; an export gives up after EXPORT_TIMEOUT_S)."""
        if self.provider is None:
            return
        stopper = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        stopper.start()
        stopper.join(timeout_s)
        if stopper.is_alive():
            logging.getLogger(__name__).warning(
                "spans not exported within %.1f s of stopping were dropped", timeout_s
            )

    # -- spans ----------------------------------------------------------------------------------------------

    def start(
        self, name: str, parent: Parent = None, attributes: Mapping[str, Any] | None = None,
        start_unix_ns: int | None = None,
    ) -> Span:  # fmt: skip
        """A span the caller ends (`span.end()`); not made current (use it across `yield`s)."""
        if not self.enabled:
            return trace.INVALID_SPAN
        return self._tracer.start_span(
            name, _context(parent), attributes=attributes, start_time=start_unix_ns
        )

    @contextlib.contextmanager
    def span(
        self, name: str, parent: Parent = None, attributes: Mapping[str, Any] | None = None
    ) -> Iterator[Span]:
        """A span over a block, current inside it (spans and `traceparent()` below hang under it); an
        exception marks it failed. Never around a `yield`: the current span is per task."""
        if not self.enabled:
            yield trace.INVALID_SPAN
            return
        span = self._tracer.start_span(name, _context(parent), attributes=attributes)
        with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
            yield span

    def record(
        self, name: str, start_unix_ns: int, end_unix_ns: int, parent: Parent = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """A span that already happened (times from time.time_ns())."""
        if self.enabled:
            self.start(name, parent, attributes, start_unix_ns).end(end_time=end_unix_ns)

    # -- context on the wire --------------------------------------------------------------------------------

    def traceparent(self, span: Span | None = None) -> str:
        """The W3C traceparent of `span` (default: this task's current span); "" when there is none."""
        if not self.enabled:
            return ""
        span = span if span is not None else trace.get_current_span()
        if not span.get_span_context().is_valid:
            return ""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get("traceparent", "")

    def metadata(self, span: Span | None = None) -> tuple[tuple[str, str], ...]:
        """gRPC call metadata carrying the trace context (empty when there is none)."""
        value = self.traceparent(span)
        return (("traceparent", value),) if value else ()

    def bind_request(self, request_id: str, span: Span | None = None) -> None:
        """Tags this task's log lines with the request id and `span`'s trace id (call in the request's own
        task: the binding lives in the task's context)."""
        span = span if span is not None else trace.get_current_span()
        context = span.get_span_context()
        logs.bind_request(request_id, f"{context.trace_id:032x}" if context.is_valid else "")


def mark_failed(span: Span, exc: BaseException, record: bool = True) -> None:
    """Marks `span` failed with the exception's message (and records the exception as a span event)."""
    if record:
        span.record_exception(exc)
    span.set_status(StatusCode.ERROR, str(exc) or type(exc).__name__)


def trace_id_of(span: Span) -> str:
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else ""


def traceparent_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The `traceparent` entry of a call's invocation metadata, or ""."""
    for key, value in metadata or ():
        if key == "traceparent":
            return value if isinstance(value, str) else value.decode()
    return ""


def _context(parent: Parent) -> otel_context.Context | None:
    if parent is None:
        return None  # the current context
    if isinstance(parent, str):
        if not parent:
            return otel_context.Context()  # no trace context on the wire: a new trace
        return _PROPAGATOR.extract({"traceparent": parent}, context=otel_context.Context())
    return trace.set_span_in_context(parent, otel_context.Context())
