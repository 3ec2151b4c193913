"""Traces: one trace from the API request through the Celery publish and the worker's task to
the provider's HTTP call, exported over OTLP/HTTP to a collector this test runs on loopback;
a bulk batch's span links to the requests that made its deliveries; and without an endpoint
nothing is instrumented at all."""

import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from apps.deliveries.models import Delivery, DeliveryStatus, Event
from notify.pipeline.dispatch import publish
from tests.conftest import ROOT
from tests.helpers import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

SPAN_KIND_SERVER, SPAN_KIND_CLIENT, SPAN_KIND_PRODUCER, SPAN_KIND_CONSUMER = 2, 3, 4, 5


@dataclass
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


@dataclass
class Collector:
    """A loopback OTLP/HTTP trace collector: it decodes what the exporters send."""

    url: str
    spans: list[ReceivedSpan] = field(default_factory=list)

    def receive(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service=resource.get("service.name", ""),
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        )
                    )

    def find(self, **wanted: Any) -> list[ReceivedSpan]:
        return [s for s in list(self.spans) if all(getattr(s, key) == value for key, value in wanted.items())]


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    """The collector, and the environment that points the processes a test starts at it."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path == "/v1/traces":
                collector.receive(body)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    collector = Collector(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # milliseconds: export soon after a span ends
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    yield collector
    server.shutdown()
    server.server_close()


def event_post(*, base_url: str, auth_header: str, category: str, external_id: str, request_id: str) -> str:
    response = requests.post(
        f"{base_url}/api/v1/events",
        headers={"Authorization": auth_header, "X-Request-ID": request_id},
        json={
            "category": category,
            "recipients": [{"external_id": external_id, "email": f"{external_id}@example.com"}],
            "data": {"name": "you"},
        },
        timeout=30,
    )
    assert response.status_code == 202, response.text
    assert response.headers["X-Request-ID"] == request_id
    return response.json()["notification_ids"][0]


def test_one_trace_follows_a_critical_email_from_the_request_to_the_provider_call(
    workspace, workers, web_server_start, sandbox, collector
):
    workers.start("critical")
    base_url = web_server_start()
    notification_id = event_post(
        base_url=base_url,
        auth_header=workspace.auth_header,
        category="otp",
        external_id="ada",
        request_id="req-trace-1",
    )
    delivery = wait_for(
        lambda: Delivery.objects.filter(notification_id=notification_id, status=DeliveryStatus.SENT).first(),
        what="the delivery to be sent",
    )
    provider_call = wait_for(
        lambda: [
            s
            for s in collector.find(kind=SPAN_KIND_CLIENT, service="notify-worker")
            if s.attributes.get("notify.delivery_id") == str(delivery.id)
        ],
        what="the provider call's span",
    )[0]
    trace_id = provider_call.trace_id
    assert "/postmark/" in (provider_call.attributes.get("url.full") or provider_call.attributes.get("http.url"))
    assert provider_call.attributes["notify.notification_id"] == notification_id
    assert provider_call.attributes["notify.correlation_id"] == "req-trace-1"

    def spans_of_the_trace() -> list[ReceivedSpan] | None:
        spans = collector.find(trace_id=trace_id)
        kinds = {s.kind for s in spans}
        return spans if {SPAN_KIND_SERVER, SPAN_KIND_PRODUCER, SPAN_KIND_CONSUMER} <= kinds else None

    in_trace = wait_for(spans_of_the_trace, what="the request's, the publish's and the task's spans")
    [server] = [s for s in in_trace if s.kind == SPAN_KIND_SERVER]
    assert server.service == "notify-web"
    assert server.attributes["http.route"] == "api/v1/events"
    assert server.attributes["notify.correlation_id"] == "req-trace-1"
    assert server.attributes["notify.notification_ids"] == [notification_id]
    assert server.attributes["notify.notification_count"] == 1
    [published] = [s for s in in_trace if s.kind == SPAN_KIND_PRODUCER and s.name.endswith("notify.send_deliveries")]
    [run] = [s for s in in_trace if s.kind == SPAN_KIND_CONSUMER and s.name.endswith("notify.send_deliveries")]
    assert published.service == "notify-web" and run.service == "notify-worker"
    # The chain: the request made the publish, the publish the task run, the task the call.
    assert run.parent_span_id == published.span_id
    assert run.attributes["notify.delivery_ids"] == [str(delivery.id)]
    assert run.attributes["notify.delivery_count"] == 1
    assert run.attributes["notify.correlation_id"] == "req-trace-1"
    spans_by_id = {s.span_id: s for s in in_trace}
    ancestor = provider_call
    while ancestor.parent_span_id in spans_by_id:
        ancestor = spans_by_id[ancestor.parent_span_id]
    assert ancestor is server
    # The database calls are traced too (psycopg), inside the same trace.
    assert any(s.attributes.get("db.system") == "postgresql" for s in in_trace if s.service == "notify-worker")
    event = Event.objects.get(notifications__id=notification_id)
    assert server.attributes["notify.event_ids"] == [str(event.id)]
    assert event.correlation_id == "req-trace-1"
    assert event.traceparent is not None and event.traceparent.split("-")[1] == trace_id


def test_a_bulk_batch_links_to_the_requests_that_made_its_deliveries(
    workspace, workers, web_server_start, sandbox, broker: redis.Redis, collector
):
    base_url = web_server_start()
    notification_ids = [
        event_post(
            base_url=base_url,
            auth_header=workspace.auth_header,
            category="digest",
            external_id=f"bulk{n}",
            request_id=f"req-bulk-{n}",
        )
        for n in range(2)
    ]
    events = list(Event.objects.filter(notifications__id__in=notification_ids))
    request_traces = {event.traceparent.split("-")[1] for event in events if event.traceparent}
    assert len(request_traces) == 2
    # The two requests' own messages are dropped, and both deliveries travel in one batch, as
    # the sweeper republishes them: the batch's trace is its own, linked to both requests.
    broker.flushdb()
    delivery_ids = [
        str(i) for i in Delivery.objects.filter(notification_id__in=notification_ids).values_list("id", flat=True)
    ]
    publish(channel="email", priority="bulk", delivery_ids=delivery_ids)
    # A prefork pool, as deployed: its child sets tracing up after the fork.
    workers.start("bulk", concurrency=2)
    [run] = wait_for(
        lambda: [s for s in collector.find(kind=SPAN_KIND_CONSUMER) if s.attributes.get("notify.delivery_count") == 2],
        what="the batch's task span",
    )
    assert sorted(run.attributes["notify.delivery_ids"]) == sorted(delivery_ids)
    assert run.trace_id not in request_traces
    assert {trace_id for trace_id, _ in run.links} == request_traces

    # Each link points at its request's server span.
    def request_spans() -> set[tuple[str, str]]:
        return {(s.trace_id, s.span_id) for s in collector.find(kind=SPAN_KIND_SERVER) if s.trace_id in request_traces}

    wait_for(lambda: len(request_spans()) == 2, what="the requests' spans")
    assert set(run.links) == request_spans()


INSTRUMENTATION_STATE = """
import json, sys
import config.asgi
from celery.signals import before_task_publish, worker_process_init
worker_process_init.send(sender=None)  # what a prefork worker's child runs after the fork
import psycopg, requests
from django.conf import settings
from opentelemetry import trace
print(json.dumps({
    "tracer_provider": type(trace.get_tracer_provider()).__name__,
    "django_middleware": any("opentelemetry" in m for m in settings.MIDDLEWARE),
    "requests_wrapped": hasattr(requests.Session.send, "__wrapped__"),
    "psycopg_wrapped": hasattr(psycopg.connect, "__wrapped__") or hasattr(psycopg.Connection.connect, "__wrapped__"),
    "celery_receivers": [repr(r[1]) for r in before_task_publish.receivers if "opentelemetry" in repr(r[1])],
    "sdk_tracing_loaded": "opentelemetry.sdk.trace" in sys.modules,
    "instrumentation_loaded": [m for m in sys.modules if m.startswith("opentelemetry.instrumentation")],
}))
"""


def instrumentation_state(*, endpoint: str | None) -> dict[str, Any]:
    """What a web process (and a worker's child) has installed, as it starts."""
    env = dict(os.environ)
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    if endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    result = subprocess.run(
        [sys.executable, "-c", INSTRUMENTATION_STATE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_without_an_endpoint_nothing_is_instrumented():
    off = instrumentation_state(endpoint=None)
    assert off == {
        "tracer_provider": "ProxyTracerProvider",
        "django_middleware": False,
        "requests_wrapped": False,
        "psycopg_wrapped": False,
        "celery_receivers": [],
        "sdk_tracing_loaded": False,
        "instrumentation_loaded": [],
    }
    # The same probe sees everything once the endpoint is set (so it can tell the difference).
    on = instrumentation_state(endpoint="http://127.0.0.1:9")
    assert on["tracer_provider"] == "TracerProvider"
    assert on["django_middleware"] and on["requests_wrapped"] and on["psycopg_wrapped"]
    assert on["celery_receivers"] and on["instrumentation_loaded"]
