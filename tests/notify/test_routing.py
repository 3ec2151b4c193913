"""Routing: fallback chains in the recipient's channel order that move on when a step fails,
cannot be used or goes unconfirmed, and stop at the first step that reaches the person; and
escalations that a read cancels. Real SDKs to the sandbox, the real database."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from apps.catalog.models import Category, OverBudget, Routing, TemplateVariant, TemplateVersion
from apps.deliveries.models import Delivery, DeliveryStatus
from apps.inbox.services import inbox_item_mark
from apps.recipients.models import Device, PreferenceSet, Recipient
from notify.channels.email import EmailChannel
from notify.pipeline.feedback import feedback_receive
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest
from notify.pipeline.record import Feedback
from notify.pipeline.routing import routing_sweep
from notify.pipeline.send import deliveries_send
from tests.factories import CategoryFactory, TemplateFactory

# Transactions commit, so that a step's activation publishes like in production.
pytestmark = pytest.mark.django_db(transaction=True)


def category(workspace, *, channels: list[str], **fields) -> Category:  # type: ignore[no-untyped-def]
    template = TemplateFactory(tenant=workspace.tenant, key="reach")
    version = TemplateVersion.objects.create(template=template, number=1)
    for channel in {*channels, *fields.get("escalate_to", [])}:
        TemplateVariant.objects.create(
            version=version, channel=channel, subject="Hi", title="Hi", body="Your order shipped"
        )
    return CategoryFactory(tenant=workspace.tenant, key="reach", template=template, default_channels=channels, **fields)


@pytest.fixture
def ada(workspace) -> Recipient:  # type: ignore[no-untyped-def]
    return Recipient.objects.create(
        tenant=workspace.tenant, external_id="ada", email="ada@example.com", phone="+14155550123"
    )


def notify(workspace) -> list[Delivery]:  # type: ignore[no-untyped-def]
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[EventRequest(category_key="reach", recipients=[RecipientRef(external_id="ada")])],
    )
    return chain(result.response["notification_ids"][0])


def chain(notification_id: str) -> list[Delivery]:
    return list(Delivery.objects.filter(notification_id=notification_id).order_by("step", "channel"))


def send_queued(deliveries: list[Delivery]) -> list[Delivery]:
    """Send whatever of the notification is queued, as a worker would, and read it back."""
    queued = Delivery.objects.filter(notification_id=deliveries[0].notification_id, status=DeliveryStatus.QUEUED)
    deliveries_send(delivery_ids=[str(d.pk) for d in queued])
    return chain(str(deliveries[0].notification_id))


def states(deliveries: list[Delivery]) -> list[tuple[str, str]]:
    return [(d.channel, d.status) for d in deliveries]


def test_the_chain_skips_what_cannot_be_used_and_moves_on_after_a_failure(workspace, sandbox, ada):
    category(workspace, channels=["push", "sms", "email"], routing=Routing.FALLBACK)
    sandbox.faults_set(provider="twilio", address_status={"+14155550123": 21211})  # Twilio: invalid number
    deliveries = notify(workspace)
    # No device: push cannot be used, so SMS goes first and email waits.
    assert states(deliveries) == [("push", "suppressed"), ("sms", "queued"), ("email", "standby")]

    deliveries = send_queued(deliveries)
    assert states(deliveries) == [("push", "suppressed"), ("sms", "failed"), ("email", "queued")]
    email = deliveries[2]
    assert email.events.last().reason.startswith("fallback from step 2 (sms): permanent failure")

    deliveries = send_queued(deliveries)
    assert states(deliveries)[2] == ("email", "sent")
    assert [r["provider"] for r in sandbox.requests_log()] == ["twilio", "postmark"]


def test_the_chain_follows_the_recipients_order_and_stops_at_the_first_success(workspace, sandbox, ada):
    category(workspace, channels=["email", "sms", "push"], routing=Routing.FALLBACK)
    Device.objects.create(tenant=workspace.tenant, recipient=ada, platform="android", token="ada-phone")
    PreferenceSet.objects.create(recipient=ada, channel_order=["push", "email"])
    deliveries = notify(workspace)
    assert states(deliveries) == [("push", "queued"), ("email", "standby"), ("sms", "standby")]
    deliveries = send_queued(deliveries)  # push accepted: as far as push goes, it reached them
    assert states(deliveries) == [("push", "sent"), ("email", "cancelled"), ("sms", "cancelled")]
    assert deliveries[1].status_reason == "step 1 (push) reached the recipient"


def test_the_chain_moves_on_when_a_step_is_not_confirmed_in_time(workspace, sandbox, ada):
    category(workspace, channels=["email", "sms"], routing=Routing.FALLBACK, fallback_timeout=timedelta(minutes=10))
    deliveries = send_queued(notify(workspace))
    assert states(deliveries) == [("email", "sent"), ("sms", "standby")]  # no delivery report yet
    assert routing_sweep(now=timezone.now() + timedelta(minutes=5)) == 0  # still within the timeout
    assert routing_sweep(now=timezone.now() + timedelta(minutes=11)) == 1
    deliveries = chain(str(deliveries[0].notification_id))
    assert states(deliveries) == [("email", "sent"), ("sms", "queued")]
    assert deliveries[1].events.last().reason == "fallback from step 1 (email): not confirmed delivered within 0:10:00"


def test_a_delivery_report_within_the_timeout_stops_the_chain(workspace, sandbox, ada):
    category(workspace, channels=["email", "sms"], routing=Routing.FALLBACK, fallback_timeout=timedelta(minutes=10))
    email = send_queued(notify(workspace))[0]
    feedback_receive(
        feedback=Feedback(
            delivery_id=str(email.pk), normalized_status="delivered", provider_status="postmark:Delivery"
        ),
        address_for=EmailChannel().address_for,
    )
    assert states(chain(str(email.notification_id))) == [("email", "delivered"), ("sms", "cancelled")]
    assert routing_sweep(now=timezone.now() + timedelta(minutes=11)) == 0


def test_an_escalation_is_sent_when_unread_and_cancelled_by_a_read(workspace, sandbox, ada):
    category(workspace, channels=["inapp"], escalate_after=timedelta(minutes=30), escalate_to=["email"])
    unread = send_queued(notify(workspace))
    assert states(unread) == [("email", "standby"), ("inapp", "sent")]

    read = send_queued(notify(workspace))
    inbox_item_mark(recipient_id=ada.id, item_id=read[1].inbox_item.id, mark="read")
    # The read also counts as the in-app delivery's open (the engagement analytics).
    assert states(chain(str(read[0].notification_id))) == [("email", "cancelled"), ("inapp", "opened")]
    assert chain(str(read[0].notification_id))[0].status_reason == "read in the in-app inbox"

    assert routing_sweep(now=timezone.now()) == 0  # not yet: half an hour to read it
    Delivery.objects.filter(notification_id=unread[0].notification_id, escalation=True).update(
        next_attempt_at=timezone.now()  # as if the half hour had passed
    )
    assert routing_sweep(now=timezone.now()) == 1
    assert states(send_queued(unread)) == [("email", "sent"), ("inapp", "sent")]
    assert len(sandbox.requests_log(provider="postmark")) == 1


def test_past_the_daily_sms_budget_a_chain_falls_back_to_email_or_the_text_is_held(
    workspace, sandbox, ada, broker, settings
):
    settings.NOTIFY_SMS_SEGMENT_PRICE = "0.01"
    workspace.tenant.sms_daily_budget = Decimal("0.02")  # two one-segment texts
    workspace.tenant.save()
    reach = category(workspace, channels=["sms", "email"], routing=Routing.FALLBACK, over_budget=OverBudget.FALLBACK)
    for _ in range(2):
        assert states(send_queued(notify(workspace))) == [("sms", "sent"), ("email", "cancelled")]
    over = send_queued(notify(workspace))
    assert states(over) == [("sms", "suppressed"), ("email", "queued")]
    assert over[0].status_reason == "the daily sms budget of 0.02 is spent"
    assert states(send_queued(over)) == [("sms", "suppressed"), ("email", "sent")]

    reach.over_budget = OverBudget.HOLD
    reach.save()
    held = send_queued(notify(workspace))[0]
    assert held.status == DeliveryStatus.DEFERRED
    assert held.next_attempt_at.date() == (timezone.now() + timedelta(days=1)).date()
    assert len(sandbox.requests_log(provider="twilio")) == 2


def test_a_chain_left_stalled_by_a_lost_worker_is_moved_on_by_the_sweeper(workspace, sandbox, ada):
    category(workspace, channels=["sms", "email"], routing=Routing.FALLBACK)
    deliveries = notify(workspace)
    # As if a worker recorded the failure, then died before moving the chain on.
    Delivery.objects.filter(pk=deliveries[0].pk).update(status=DeliveryStatus.DEAD, status_reason="worker lost")
    assert routing_sweep(now=timezone.now()) == 1
    assert states(chain(str(deliveries[0].notification_id))) == [("sms", "dead"), ("email", "queued")]
    assert routing_sweep(now=timezone.now()) == 0
