"""Webhooks to producers, end to end: a real send through a real worker writes the outbox row,
the webhooks worker POSTs it, signed, to a loopback receiver the test runs, retries a failing
endpoint with backoff, disables it and tells its owner, and a replay from the admin delivers."""

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from apps.deliveries.models import DeliveryStatus
from apps.webhooks.models import MessageStatus, WebhookAttempt, WebhookEndpoint, WebhookMessage
from apps.webhooks.services import endpoint_deliver, secret_generate
from tests.e2e.test_delivery_guarantees import trigger, wait_for_status
from tests.helpers import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


@dataclass
class Receiver:
    """A producer's webhook endpoint on loopback: records each request, answers `status`."""

    url: str
    host: str
    status: int = 200
    requests: list[dict] = field(default_factory=list)

    def events(self) -> list[dict]:
        found = []
        for request in self.requests:
            body = json.loads(request["body"])
            found.extend(body if isinstance(body, list) else [body])
        return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="", host="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            state.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
            self.send_response(state.status)
            self.end_headers()
            self.wfile.write(b"ok" if state.status < 300 else b"receiver is down")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    state.url, state.host = f"http://127.0.0.1:{port}/hooks", f"127.0.0.1:{port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def allowed(receiver: Receiver, settings, monkeypatch: pytest.MonkeyPatch) -> Receiver:  # type: ignore[no-untyped-def]
    """The receiver on the webhook allow list, here and in the processes the test starts, with
    a retry schedule of a second or two."""
    settings.NOTIFY_WEBHOOK_ALLOWED_HOSTS = [receiver.host]
    short = {
        "NOTIFY_WEBHOOK_ALLOWED_HOSTS": receiver.host,
        "NOTIFY_WEBHOOK_MAX_ATTEMPTS": "3",
        "NOTIFY_WEBHOOK_RETRY_BASE_SECONDS": "0.3",
        "NOTIFY_WEBHOOK_RETRY_CAP_SECONDS": "1",
        "NOTIFY_WEBHOOK_INTERVAL_SECONDS": "1",
        "NOTIFY_WEBHOOK_TIMEOUT_SECONDS": "3",
    }
    for name, value in short.items():
        monkeypatch.setenv(name, value)
    return receiver


@pytest.fixture
def ops(admin_user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(admin_user)
    return client


def register(api, *, url: str, event_types: list[str], **extra: object):  # type: ignore[no-untyped-def]
    return api.post(
        "/api/v1/webhook-endpoints",
        data=json.dumps({"url": url, "event_types": event_types, **extra}),
        content_type="application/json",
    )


def test_a_sent_delivery_reaches_the_producer_signed(api, workspace, allowed, workers, sandbox):
    response = register(api, url=allowed.url, event_types=["delivery.sent", "delivery.failed"])
    assert response.status_code == 201, response.content
    secret = response.json()["secret"]
    assert secret.startswith("whsec_")
    detail = api.get(f"/api/v1/webhook-endpoints/{response.json()['id']}")
    assert detail.status_code == 200 and "secret" not in detail.json()
    workers.start("normal", "webhooks")

    sent = trigger(api, category="welcome", count=2, prefix="w")
    wait_for_status(sent, DeliveryStatus.SENT)
    wait_for(lambda: len(allowed.events()) == 2, what="both delivery.sent events to arrive")

    events = allowed.events()
    assert {e["type"] for e in events} == {"delivery.sent"}
    assert sorted(e["data"]["notification_id"] for e in events) == sorted(sent)
    assert {e["data"]["recipient"] for e in events} == {"w0", "w1"}
    assert {e["data"]["category"] for e in events} == {"welcome"}
    for request in allowed.requests:
        # The Standard Webhooks reference implementation accepts it, and rejects a forgery.
        verified = Webhook(secret).verify(request["body"], request["headers"])
        assert verified
        with pytest.raises(WebhookVerificationError):
            Webhook(secret_generate()).verify(request["body"], request["headers"])
    # The receiver may see the POST before the worker has recorded its answer.
    wait_for(lambda: WebhookMessage.objects.filter(status=MessageStatus.DELIVERED).count() == 2, what="both recorded")
    attempt = WebhookAttempt.objects.first()
    assert attempt is not None and attempt.status_code == 200 and attempt.response_excerpt == "ok"


def test_a_failing_endpoint_is_retried_disabled_its_owner_told_and_a_replay_delivers(
    api, workspace, allowed, workers, sandbox, ops
):
    allowed.status = 500
    response = register(api, url=allowed.url, event_types=["delivery.sent"], alert_email="owner@example.com")
    assert response.status_code == 201, response.content
    endpoint = WebhookEndpoint.objects.get(pk=response.json()["id"])
    workers.start("normal", "webhooks")
    workers.start_beat()

    sent = trigger(api, category="welcome", count=1, prefix="f")
    wait_for_status(sent, DeliveryStatus.SENT)
    wait_for(lambda: not WebhookEndpoint.objects.get(pk=endpoint.pk).enabled, timeout=60, what="the endpoint disabled")
    message = WebhookMessage.objects.get(endpoint=endpoint)
    assert message.status == MessageStatus.FAILED and message.attempt_count == 3
    attempts = list(message.attempts.order_by("id"))
    assert [a.status_code for a in attempts] == [500, 500, 500]
    assert attempts[0].response_excerpt == "receiver is down"
    gaps = [(b.created_at - a.created_at).total_seconds() for a, b in zip(attempts, attempts[1:], strict=False)]
    assert all(gap >= 0.15 for gap in gaps), gaps  # backed off, not hammered
    assert len(allowed.requests) == 3
    assert "3 failed attempts" in WebhookEndpoint.objects.get(pk=endpoint.pk).disabled_reason
    wait_for(
        lambda: any(r["to"] == "owner@example.com" for r in sandbox.requests_log(provider="postmark")),
        what="the owner's alert email",
    )

    # The owner fixed the endpoint: ops enable it and replay its failed message from the admin.
    allowed.status = 200
    endpoints = reverse("admin:webhooks_webhookendpoint_changelist")
    assert ops.post(endpoints, {"action": "enable", "_selected_action": [endpoint.pk]}).status_code == 302
    messages = reverse("admin:webhooks_webhookmessage_changelist")
    assert ops.post(messages, {"action": "replay", "_selected_action": [message.pk]}).status_code == 302
    wait_for(lambda: WebhookMessage.objects.get(pk=message.pk).status == MessageStatus.DELIVERED, what="the replay")
    assert len(allowed.requests) == 4
    assert Webhook(str(endpoint.secret)).verify(allowed.requests[-1]["body"], allowed.requests[-1]["headers"])
    page = ops.get(reverse("admin:webhooks_webhookmessage_change", args=[message.pk]))
    assert page.status_code == 200 and b"receiver is down" in page.content


def test_a_loopback_url_off_the_allow_list_is_refused_at_registration_and_at_send_time(api, workspace, receiver):
    loopback = f"https://{receiver.host}/hooks"
    response = register(api, url=loopback, event_types=["delivery.sent"])
    assert response.status_code == 400
    assert "loopback" in json.dumps(response.json()["error"]["fields"]["url"])
    assert not WebhookEndpoint.objects.exists()

    # Saved behind the API's back (or allowed once, and the allow list changed since).
    endpoint = WebhookEndpoint.objects.create(
        tenant=workspace.tenant, url=loopback, event_types=["delivery.sent"], secret=secret_generate()
    )
    message = WebhookMessage.objects.create(
        endpoint=endpoint,
        tenant=workspace.tenant,
        event_type="delivery.sent",
        payload={"type": "delivery.sent", "data": {}},
        next_attempt_at=timezone.now(),
        created_at=timezone.now(),
    )
    assert endpoint_deliver(endpoint_id=endpoint.pk) == 0
    message.refresh_from_db()
    assert message.status == MessageStatus.PENDING and "outbound guard" in message.last_error
    assert "loopback" in message.attempts.get().error
    assert receiver.requests == []


def test_no_outbox_rows_for_a_tenant_without_endpoints(api, workspace, allowed, workers, sandbox):
    from tests.notify.test_tenant_providers import workspace_of_another_tenant

    other = workspace_of_another_tenant()
    WebhookEndpoint.objects.create(
        tenant=other.tenant, url=allowed.url, event_types=["delivery.sent"], secret=secret_generate()
    )
    workers.start("normal", "webhooks")
    sent = trigger(api, category="welcome", count=3, prefix="n")
    wait_for_status(sent, DeliveryStatus.SENT)
    assert not WebhookMessage.objects.exists()
    assert allowed.requests == []


def pending_message(*, endpoint: WebhookEndpoint, number: int) -> WebhookMessage:
    now = timezone.now()
    return WebhookMessage.objects.create(
        endpoint=endpoint,
        tenant=endpoint.tenant,
        event_type="delivery.sent",
        payload={"type": "delivery.sent", "timestamp": now.isoformat(), "data": {"number": number}},
        next_attempt_at=now,
        created_at=now,
    )


def test_a_backlog_goes_in_one_signed_post_as_an_array(workspace, allowed):
    endpoint = WebhookEndpoint.objects.create(
        tenant=workspace.tenant, url=allowed.url, event_types=["delivery.sent"], secret=secret_generate()
    )
    messages = [pending_message(endpoint=endpoint, number=n) for n in range(3)]
    assert endpoint_deliver(endpoint_id=endpoint.pk) == 3
    assert len(allowed.requests) == 1
    request = allowed.requests[0]
    body = json.loads(request["body"])
    assert [event["data"]["number"] for event in body] == [0, 1, 2]
    assert [event["id"] for event in body] == [f"msg_{m.pk}" for m in messages]
    assert request["headers"]["webhook-id"] == f"batch_{messages[0].pk}_3"
    assert Webhook(str(endpoint.secret)).verify(request["body"], request["headers"]) == body
    assert set(WebhookMessage.objects.values_list("status", flat=True)) == {MessageStatus.DELIVERED}


def test_an_open_circuit_holds_an_endpoints_messages_without_spending_attempts(workspace, allowed, settings):
    settings.NOTIFY_WEBHOOK_CIRCUIT_FAILURES = 2
    allowed.status = 503
    endpoint = WebhookEndpoint.objects.create(
        tenant=workspace.tenant, url=allowed.url, event_types=["delivery.sent"], secret=secret_generate()
    )
    message = pending_message(endpoint=endpoint, number=0)
    for _ in range(3):
        WebhookMessage.objects.filter(pk=message.pk).update(next_attempt_at=timezone.now())
        endpoint_deliver(endpoint_id=endpoint.pk)
    message.refresh_from_db()
    assert len(allowed.requests) == 2  # the third was not tried
    assert message.attempt_count == 2 and message.status == MessageStatus.PENDING
    assert message.last_error == "the endpoint's circuit is open"
    assert message.next_attempt_at > timezone.now()


def test_recipient_changes_write_their_events_with_the_change(workspace, allowed):
    from apps.recipients.services import consent_record, unsubscribe
    from tests.factories import RecipientFactory

    endpoint = WebhookEndpoint.objects.create(
        tenant=workspace.tenant,
        url=allowed.url,
        event_types=["recipient.unsubscribed", "recipient.consent_changed"],
        secret=secret_generate(),
    )
    recipient = RecipientFactory(tenant=workspace.tenant, external_id="u1")
    unsubscribe(recipient=recipient, category_key="welcome", channel="email")
    consent_record(recipient=recipient, channel="sms", granted=True, source="signup")
    events = {m.event_type: m.payload["data"] for m in WebhookMessage.objects.filter(endpoint=endpoint)}
    assert events["recipient.unsubscribed"] == {"recipient": "u1", "category": "welcome", "channel": "email"}
    assert events["recipient.consent_changed"] == {
        "recipient": "u1",
        "channel": "sms",
        "granted": True,
        "source": "signup",
    }
