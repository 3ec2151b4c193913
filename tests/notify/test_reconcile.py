"""Reconciliation: a delivery whose last attempt is in doubt (its worker died, or the provider
did not answer in time) is looked for at the provider, through its real search API in the
sandbox, before it is sent again. The sandbox accepts repeats, as the providers do, and
counts them: a duplicate here would reach a person."""

import time
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.core import mail
from django.utils import timezone

from apps.catalog.models import Category, CategoryKind, WhenInDoubt
from apps.deliveries.models import DeadLetter, Delivery, DeliveryStatus
from notify.channels.base import SendOutcome
from notify.pipeline.dispatch import sweep
from notify.pipeline.send import LeasedBatch, deliveries_claim
from tests.helpers import metric_value, metrics_scrape, wait_for
from tests.notify.test_send import ingest_one, send_now
from tests.notify.test_sms import send_sms, sms_category  # noqa: F401 - a fixture

NO_DUPLICATES = {"postmark": 0, "twilio": 0, "fcm": 0, "webpush": 0}


@pytest.fixture(autouse=True)
def settle_at_once(settings):  # type: ignore[no-untyped-def]
    settings.NOTIFY_RECONCILE_AFTER_SECONDS = 0


def worker_died(delivery: Delivery) -> Delivery:
    """The state a killed worker leaves: the delivery leased and unrecorded, the lease run
    out; then the sweeper re-queues it."""
    Delivery.objects.filter(pk=delivery.pk).update(
        status=DeliveryStatus.SENDING,
        lease_token=None,
        lease_expires_at=timezone.now() - timedelta(seconds=1),
        provider_message_id="",  # as its claim left it: a batch request writes no note
    )
    assert sweep().leases_expired == 1
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.QUEUED and delivery.in_doubt_since is not None
    return delivery


def accepted(sandbox, provider: str) -> int:  # type: ignore[no-untyped-def]
    return sandbox.stats()["by_outcome"].get(f"{provider}.accepted", 0)


def reasons(delivery: Delivery) -> list[str]:
    return list(delivery.events.values_list("reason", flat=True))


def test_a_delivery_the_provider_took_before_its_worker_died_is_found_and_not_sent_again(workspace, sandbox):
    delivery = send_now(ingest_one(workspace))
    first_message_id = delivery.provider_message_id
    delivery = send_now(worker_died(delivery))
    assert delivery.status == DeliveryStatus.SENT
    assert delivery.provider_message_id == first_message_id
    assert delivery.in_doubt_since is None
    assert any(reason.startswith("found at the provider") for reason in reasons(delivery))
    assert accepted(sandbox, "postmark") == 1
    assert sandbox.stats()["duplicates"] == NO_DUPLICATES


def test_a_delivery_the_provider_never_got_is_sent_once_after_looking(workspace, sandbox):
    delivery = send_now(worker_died(ingest_one(workspace)))
    assert delivery.status == DeliveryStatus.SENT
    assert accepted(sandbox, "postmark") == 1
    assert not any(reason.startswith("found at the provider") for reason in reasons(delivery))


def test_an_email_timeout_is_in_doubt_and_then_found_rather_than_resent(workspace, sandbox, settings):
    settings.ANYMAIL = {**django_settings.ANYMAIL, "REQUESTS_TIMEOUT": 0.3}
    # The provider takes the message, but answers after the client gave up.
    sandbox.faults_set(spike_rate=1.0, spike_ms=700)
    delivery = send_now(ingest_one(workspace))
    assert delivery.status == DeliveryStatus.RETRYING
    assert delivery.in_doubt_since is not None
    sandbox.faults_set()
    wait_for(lambda: accepted(sandbox, "postmark") == 1, what="the provider to take the timed-out message")

    delivery = send_now(delivery)
    assert delivery.status == DeliveryStatus.SENT
    assert accepted(sandbox, "postmark") == 1
    assert sandbox.stats()["duplicates"] == NO_DUPLICATES


def test_an_sms_timeout_is_found_in_twilios_message_list(workspace, sms_category, sandbox, settings):  # noqa: F811
    settings.NOTIFY_SMS_TIMEOUT_SECONDS = 0.3
    sandbox.faults_set(provider="twilio", spike_rate=1.0, spike_ms=700)
    delivery = send_sms(workspace, phone="+14155550123", text="Your code is 424242")
    assert delivery.status == DeliveryStatus.RETRYING and delivery.in_doubt_since is not None
    sandbox.faults_set(provider="twilio")
    wait_for(lambda: accepted(sandbox, "twilio") == 1, what="Twilio to take the timed-out message")

    delivery = send_now(delivery)
    assert delivery.status == DeliveryStatus.SENT
    assert delivery.provider_message_id.startswith("SM")
    assert accepted(sandbox, "twilio") == 1
    assert sandbox.stats()["duplicates"] == NO_DUPLICATES


def test_an_in_doubt_delivery_waits_for_the_providers_search_to_catch_up(workspace, sandbox, settings):
    settings.NOTIFY_RECONCILE_AFTER_SECONDS = 60
    delivery = send_now(worker_died(ingest_one(workspace)))
    assert delivery.status == DeliveryStatus.DEFERRED
    assert delivery.next_attempt_at >= delivery.in_doubt_since + timedelta(seconds=59)
    assert sandbox.stats()["total"] == 0


def test_a_provider_that_cannot_answer_leaves_the_delivery_in_doubt_and_sends_nothing(workspace, sandbox):
    delivery = worker_died(ingest_one(workspace))
    sandbox.faults_set(error_rate=1.0, error_status=503)
    delivery = send_now(delivery)
    assert delivery.status == DeliveryStatus.RETRYING
    assert delivery.in_doubt_since is not None
    assert "could not say whether it has it" in delivery.status_reason
    assert accepted(sandbox, "postmark") == 0

    sandbox.faults_set()
    time.sleep(0.01)
    assert send_now(delivery).status == DeliveryStatus.SENT
    assert accepted(sandbox, "postmark") == 1


@pytest.mark.parametrize(
    ("when_in_doubt", "status", "sent"),
    [(WhenInDoubt.HOLD, DeliveryStatus.DEAD, 0), (WhenInDoubt.RESEND, DeliveryStatus.SENT, 1)],
)
def test_when_the_provider_cannot_be_asked_the_category_decides(workspace, settings, when_in_doubt, status, sent):
    # An ESP whose search is not wired: Django's own in-memory backend.
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    Category.objects.filter(pk=workspace.normal.pk).update(when_in_doubt=when_in_doubt)
    delivery = send_now(worker_died(ingest_one(workspace)))
    assert delivery.status == status
    assert len(mail.outbox) == sent
    if status == DeliveryStatus.DEAD:
        assert "held for an operator" in DeadLetter.objects.get(delivery=delivery).reason


def test_by_default_only_critical_categories_resend_what_cannot_be_asked_about(workspace, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert send_now(worker_died(ingest_one(workspace))).status == DeliveryStatus.DEAD
    Category.objects.filter(pk=workspace.critical.pk).update(kind=CategoryKind.CRITICAL)
    assert send_now(worker_died(ingest_one(workspace, category="otp"))).status == DeliveryStatus.SENT


def test_a_text_noted_as_taken_before_its_worker_died_is_recorded_sent_by_the_sweeper(
    workspace,
    sms_category,  # noqa: F811
    sandbox,
    metrics_token,
):
    """A text is one request: its provider id is noted on the row as Twilio answers, so the
    sweeper records the send of a worker that died before recording the chunk."""
    delivery = send_sms(workspace, phone="+14155550123", text="Your code is 777777")
    sid = delivery.provider_message_id
    assert delivery.status == DeliveryStatus.SENT and sid.startswith("SM")
    # The worker's state when it died: the row leased, the note written, nothing recorded.
    Delivery.objects.filter(pk=delivery.pk).update(
        status=DeliveryStatus.SENDING, lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    sent = {"channel": "sms", "tenant": workspace.tenant.slug, "state": "sent"}
    before = metric_value(metrics_scrape(), "notify_deliveries_total", **sent)
    assert sweep().leases_expired == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.provider_message_id) == (DeliveryStatus.SENT, sid)
    assert "its id was noted" in reasons(delivery)[-1]
    assert accepted(sandbox, "twilio") == 1
    assert metric_value(metrics_scrape(), "notify_deliveries_total", **sent) == before + 1  # as a send is counted


def test_a_note_is_written_on_the_leased_row_only_and_at_once(workspace):
    """The note's own statement: it lands on the row this lease holds, committed before the
    chunk is recorded, and never on a row another worker's lease holds now."""
    held, taken_away = ingest_one(workspace), ingest_one(workspace)
    token, claimed = deliveries_claim(delivery_ids=[str(held.pk), str(taken_away.pk)])
    Delivery.objects.filter(pk=taken_away.pk).update(lease_token=None)  # re-queued by the sweeper
    batch = LeasedBatch(lease_token=token, deliveries={d.pk: d for d in claimed}, context=None)  # type: ignore[arg-type]
    batch.taken_note(
        outcomes=[
            SendOutcome(delivery_id=held.pk, provider_message_id="SM-held"),
            SendOutcome(delivery_id=taken_away.pk, provider_message_id="SM-taken-away"),
        ]
    )
    held.refresh_from_db()
    taken_away.refresh_from_db()
    assert (held.status, held.provider_message_id) == (DeliveryStatus.SENDING, "SM-held")
    assert taken_away.provider_message_id == ""


def test_a_claim_clears_an_earlier_sends_provider_id_so_no_stale_note_counts(workspace, sandbox):
    delivery = send_now(ingest_one(workspace))
    assert delivery.provider_message_id
    Delivery.objects.filter(pk=delivery.pk).update(status=DeliveryStatus.RETRYING)  # as after a soft bounce
    token, claimed = deliveries_claim(delivery_ids=[str(delivery.pk)])
    assert [d.pk for d in claimed] == [delivery.pk]
    delivery.refresh_from_db()
    assert delivery.provider_message_id == ""
    # Its worker dies before any request: the sweeper re-queues it rather than calling it sent.
    Delivery.objects.filter(pk=delivery.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    sweep()
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.QUEUED and delivery.in_doubt_since is not None
