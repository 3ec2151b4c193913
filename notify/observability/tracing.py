"""Traces (OpenTelemetry): one trace follows a notification from the API request through
the Celery publish and the worker's task to the provider's HTTP call.

Tracing is on only when OTEL_EXPORTER_OTLP_ENDPOINT is set: then `tracing_setup` installs a
tracer provider exporting over OTLP/HTTP and the kept instrumentations for Django, Celery,
requests and psycopg. Otherwise nothing is imported or instrumented, and the annotations
below find no recording span and return at once."""

import os
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from notify.observability.logs import correlation_id_current, delivery_id_var, notification_id_var

# At most this many ids on a span (a bulk batch holds hundreds), and this many links from a
# batch's span to the requests that made its deliveries.
SPAN_IDS_MAX = 50
SPAN_LINKS_MAX = 32
_propagator = TraceContextTextMapPropagator()
_provider: Any = None


def tracing_enabled() -> bool:
    """Whether this process exports traces: OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    # Read from the environment, not the settings: these are the SDK's own variables (its
    # exporter reads them too), and the web entry points ask before Django is set up.
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def tracing_setup(*, process_kind: str) -> bool:
    """Install the tracer provider and the instrumentations when tracing is on (once per
    process; a prefork worker calls this in each child, after the fork). The service name
    is OTEL_SERVICE_NAME, else notify-<process kind> (web, worker, beat)."""
    global _provider
    if _provider is not None or not tracing_enabled():
        return _provider is not None
    # Imported here, so that a process without tracing never loads the SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service_name = os.environ.get("OTEL_SERVICE_NAME") or f"notify-{process_kind}"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    # The exporter reads the endpoint, headers and timeout from the OTEL_EXPORTER_OTLP_* variables.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    if process_kind == "web":
        DjangoInstrumentor().instrument(tracer_provider=provider)
    CeleryInstrumentor().instrument(tracer_provider=provider)
    RequestsInstrumentor().instrument(tracer_provider=provider, request_hook=_provider_call_annotate)
    PsycopgInstrumentor().instrument(tracer_provider=provider)
    return True


def tracing_shutdown() -> None:
    """Export the spans still buffered (a worker child or the process is exiting)."""
    if _provider is not None:
        _provider.shutdown()


def traceparent_current() -> str | None:
    """The W3C traceparent of the span being recorded (stored on an Event, so that the
    batches that send its deliveries can link back to the request); None without tracing."""
    if not trace.get_current_span().is_recording():
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def event_origin() -> dict[str, str | None]:
    """The fields of a new Event that say where it came from: the correlation id of the
    request or task making it, and that request's traceparent (for trace links)."""
    return {"correlation_id": correlation_id_current(), "traceparent": traceparent_current()}


def ingest_span_annotate(*, responses: Sequence[dict[str, Any]]) -> None:
    """Mark the request's span with the events and notifications it made (capped)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    notification_ids = [i for response in responses for i in response.get("notification_ids", ())]
    span.set_attribute("notify.event_ids", [str(r["event_id"]) for r in responses if "event_id" in r][:SPAN_IDS_MAX])
    span.set_attribute("notify.notification_ids", notification_ids[:SPAN_IDS_MAX])
    span.set_attribute("notify.notification_count", len(notification_ids))


def send_span_annotate(*, delivery_ids: Sequence[object], traceparents: Iterable[str]) -> None:
    """Mark the send task's span with its deliveries, and link it to the requests (other
    traces) whose events they came from."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    correlation_id = correlation_id_current()
    if correlation_id is not None:
        span.set_attribute("notify.correlation_id", correlation_id)
    span.set_attribute("notify.delivery_count", len(delivery_ids))
    span.set_attribute("notify.delivery_ids", [str(i) for i in delivery_ids[:SPAN_IDS_MAX]])
    own_trace_id = span.get_span_context().trace_id
    linked: set[int] = set()
    for traceparent in traceparents:
        if len(linked) >= SPAN_LINKS_MAX:
            break
        context = trace.get_current_span(_propagator.extract({"traceparent": traceparent})).get_span_context()
        if context.is_valid and context.trace_id != own_trace_id and context.trace_id not in linked:
            linked.add(context.trace_id)
            span.add_link(context, {"notify.link": "request"})


def _provider_call_annotate(span: Any, request: Any) -> None:
    # The requests instrumentation's hook: a provider call made for one message says which.
    if not span.is_recording():
        return
    delivery_id = delivery_id_var.get()
    if delivery_id is not None:
        span.set_attribute("notify.delivery_id", str(delivery_id))
        notification_id = notification_id_var.get()
        if notification_id is not None:
            span.set_attribute("notify.notification_id", str(notification_id))
    correlation_id = correlation_id_current()
    if correlation_id is not None:
        span.set_attribute("notify.correlation_id", correlation_id)
