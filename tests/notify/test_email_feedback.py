"""Email feedback: Postmark's webhooks (from the sandbox) through anymail's verified
tracking view into delivery states and the suppression list."""

import json
import uuid
from urllib.parse import urlparse

import pytest
from django.test import Client
from django.utils import timezone

from apps.deliveries.models import Delivery, DeliveryStatus
from apps.recipients.models import Suppression
from notify.pipeline.send import deliveries_send
from tests.helpers import wait_for
from tests.notify.test_send import ingest_one

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def webhooks(sandbox, live_server):  # type: ignore[no-untyped-def]
    port = urlparse(live_server.url).port
    sandbox.webhooks_set(postmark=f"http://sandbox:sandbox-webhook-secret@127.0.0.1:{port}/anymail/postmark/tracking/")
    return sandbox


def send(delivery: Delivery) -> None:
    Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
    deliveries_send(delivery_ids=[str(delivery.pk)])


def wait_for_status(delivery: Delivery, status: str) -> Delivery:
    wait_for(lambda: Delivery.objects.get(pk=delivery.pk).status == status, timeout=15, what=f"status {status}")
    return Delivery.objects.get(pk=delivery.pk)


def test_delivered_opened_clicked_are_recorded_with_the_raw_status(workspace, webhooks):
    webhooks.faults_set(final_status="clicked")
    delivery = ingest_one(workspace)
    send(delivery)
    delivery = wait_for_status(delivery, DeliveryStatus.CLICKED)
    history = list(delivery.events.values_list("status", "detail__provider_status"))
    assert history[1:] == [
        ("sent", None),
        ("delivered", "postmark:Delivery"),
        ("opened", "postmark:Open"),
        ("clicked", "postmark:Click"),
    ]


def test_a_hard_bounce_suppresses_the_address_from_then_on(workspace, webhooks, api):
    webhooks.faults_set(final_status="hard_bounce")
    waiting = ingest_one(workspace)  # planned before the bounce, sent after it
    bounced = ingest_one(workspace)
    send(bounced)
    bounced = wait_for_status(bounced, DeliveryStatus.BOUNCED)
    assert bounced.events.last().detail["provider_status"] == "postmark:Bounce/HardBounce"
    suppression = Suppression.objects.get(tenant=workspace.tenant, channel="email", address="ada@example.com")
    assert suppression.reason == "hard bounce (postmark:Bounce/HardBounce)"

    send(waiting)
    waiting.refresh_from_db()
    assert waiting.status == DeliveryStatus.SUPPRESSED
    assert waiting.status_reason.startswith("address is suppressed: hard bounce")

    response = api.post(
        "/api/v1/events",
        data=json.dumps({"category": "welcome", "recipient": "ada"}),
        content_type="application/json",
    )
    later = Delivery.objects.get(notification_id=response.json()["notification_ids"][0])
    assert later.status == DeliveryStatus.SUPPRESSED
    assert len([r for r in webhooks.requests_log() if r["outcome"] == "accepted"]) == 1


def test_a_complaint_suppresses_the_address(workspace, webhooks):
    webhooks.faults_set(final_status="complained")
    delivery = ingest_one(workspace)
    send(delivery)
    wait_for_status(delivery, DeliveryStatus.COMPLAINED)
    assert Suppression.objects.filter(address="ada@example.com", reason__startswith="spam complaint").exists()


def test_a_soft_bounce_is_retried(workspace, webhooks):
    webhooks.faults_set(final_status="soft_bounce")
    delivery = ingest_one(workspace)
    send(delivery)
    delivery = wait_for_status(delivery, DeliveryStatus.RETRYING)
    assert "SoftBounce" in delivery.events.last().detail["provider_status"]
    assert not Suppression.objects.exists()

    webhooks.faults_set(final_status="delivered")
    send(delivery)
    delivery = wait_for_status(delivery, DeliveryStatus.DELIVERED)
    assert delivery.attempt_count == 2


def test_the_tracking_webhook_requires_its_credentials(workspace, sandbox):
    delivery = ingest_one(workspace)
    send(delivery)
    payload = {
        "RecordType": "Bounce",
        "Type": "HardBounce",
        "MessageID": "x",
        "Email": "ada@example.com",
        "Metadata": {"delivery_id": str(delivery.pk)},
    }
    response = Client().post("/anymail/postmark/tracking/", data=json.dumps(payload), content_type="application/json")
    assert response.status_code in (400, 401, 403)
    assert Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.SENT
    assert not Suppression.objects.exists()


def test_feedback_during_the_send_is_applied_once_the_send_is_recorded(workspace, sandbox):
    from apps.deliveries.models import EarlyFeedback
    from notify.channels.base import SendOutcome
    from notify.channels.email import EmailChannel
    from notify.pipeline.feedback import feedback_receive
    from notify.pipeline.record import Feedback, outcomes_record
    from notify.pipeline.send import deliveries_claim

    delivery = ingest_one(workspace)
    token, claimed = deliveries_claim(delivery_ids=[str(delivery.pk)])
    early = Feedback(delivery_id=str(delivery.pk), normalized_status="delivered", provider_status="twilio:delivered")
    assert feedback_receive(feedback=early, address_for=EmailChannel().address_for)
    assert Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.SENDING
    assert EarlyFeedback.objects.count() == 1

    outcomes_record(
        lease_token=token, deliveries={d.pk: d for d in claimed}, outcomes=[SendOutcome(delivery_id=delivery.pk)]
    )
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.DELIVERED
    assert list(delivery.events.values_list("status", flat=True)) == ["queued", "sent", "delivered"]
    assert not EarlyFeedback.objects.exists()


def test_feedback_about_an_earlier_send_is_ignored(workspace, sandbox):
    from notify.channels.email import EmailChannel
    from notify.pipeline.feedback import feedback_receive
    from notify.pipeline.record import Feedback

    delivery = ingest_one(workspace)
    send(delivery)
    Delivery.objects.filter(pk=delivery.pk).update(resend_round=1)
    stale = Feedback(
        delivery_id=str(delivery.pk), normalized_status="soft_bounced", provider_status="postmark:Bounce/SoftBounce"
    )
    assert not feedback_receive(feedback=stale, address_for=EmailChannel().address_for)
    assert Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.SENT


def test_a_deferral_is_kept_in_the_history_without_a_resend(workspace, sandbox):
    from notify.channels.email import EmailChannel
    from notify.pipeline.feedback import feedback_receive
    from notify.pipeline.record import Feedback

    delivery = ingest_one(workspace)
    send(delivery)
    deferred = Feedback(
        delivery_id=str(delivery.pk), normalized_status="deferred", provider_status="postmark:Bounce/Transient"
    )
    assert feedback_receive(feedback=deferred, address_for=EmailChannel().address_for)
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.SENT
    assert delivery.events.last().reason.startswith("the provider deferred it")


def test_malformed_delivery_ids_in_feedback_are_ignored(workspace):
    from notify.channels.email import EmailChannel
    from notify.pipeline.feedback import feedback_receive
    from notify.pipeline.record import Feedback

    assert not feedback_receive(
        feedback=Feedback(delivery_id="not-a-uuid", normalized_status="delivered", provider_status="x"),
        address_for=EmailChannel().address_for,
    )


def post_signed_bounce(*, delivery_id: str, email: str):  # type: ignore[no-untyped-def]
    """A hard bounce as Postmark posts it, with the webhook credentials (so anymail takes it)."""
    import base64

    from django.conf import settings

    payload = {
        "RecordType": "Bounce",
        "Type": "HardBounce",
        "MessageID": "00000000-0000-0000-0000-000000000000",
        "Email": email,
        "BouncedAt": "2026-01-01T00:00:00Z",
        "Metadata": {"delivery_id": delivery_id},
    }
    credentials = base64.b64encode(settings.ANYMAIL["WEBHOOK_SECRET"].encode()).decode()
    return Client().post(
        "/anymail/postmark/tracking/",
        data=json.dumps(payload),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Basic {credentials}",
    )


def test_a_bounce_naming_another_address_suppresses_nothing(workspace, sandbox):
    delivery = ingest_one(workspace, email="ada@example.com")
    send(delivery)
    response = post_signed_bounce(delivery_id=str(delivery.pk), email="victim@example.com")
    assert response.status_code == 200
    assert not Suppression.objects.exists()
    # The delivery's own address, reported as the provider writes it, is suppressed.
    assert post_signed_bounce(delivery_id=str(delivery.pk), email="Ada@Example.com").status_code == 200
    assert list(Suppression.objects.values_list("address", flat=True)) == ["ada@example.com"]


def test_a_bounce_naming_an_unknown_or_non_email_delivery_suppresses_nothing(workspace, sandbox):
    assert post_signed_bounce(delivery_id=str(uuid.uuid4()), email="ada@example.com").status_code == 200
    delivery = ingest_one(workspace, email="ada@example.com")
    send(delivery)
    # The same recipient's SMS delivery: an email webhook cannot bounce it.
    Delivery.objects.filter(pk=delivery.pk).update(channel="sms")
    assert post_signed_bounce(delivery_id=str(delivery.pk), email="ada@example.com").status_code == 200
    assert Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.SENT
    assert not Suppression.objects.exists()
