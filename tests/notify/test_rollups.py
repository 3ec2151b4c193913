"""The delivery rollups agree with the history they count, including provider feedback that
arrives after a run, and every row is counted once however often the task runs."""

import json
from collections import Counter
from datetime import datetime, timedelta

import pytest
from django.conf import settings
from django.db.models import Sum
from django.utils import timezone

from apps.deliveries.models import Delivery, DeliveryEvent, DeliveryStatus, Provider
from apps.ops.models import DeliveryRollupHour, DeliveryRollupMinute, RollupCursor
from notify.channels.email import EmailChannel
from notify.observability.rollups import MINUTES_KEPT, rollups_advance
from notify.pipeline.feedback import feedback_receive
from notify.pipeline.record import Feedback
from notify.pipeline.send import deliveries_send
from tests.helpers import wait_for
from tests.notify.test_email_feedback import webhooks  # noqa: F401 - a fixture
from tests.notify.test_send import ingest_one
from tests.notify.test_tenant_providers import due_now, postmark

pytestmark = pytest.mark.django_db(transaction=True)


def settled_now() -> datetime:
    """The time at which the history written so far has just settled: its horizon lies past
    every row written so far, and before any row written later."""
    latest = DeliveryEvent.objects.order_by("-created_at").values_list("created_at", flat=True).first()
    return latest + timedelta(seconds=settings.NOTIFY_ROLLUP_SETTLE_SECONDS, microseconds=1)


def raw_counts() -> Counter:
    """The history counted as the rollups count it, in Python, from every row."""
    counts: Counter = Counter()
    for event in DeliveryEvent.objects.select_related("delivery__notification"):
        occurred = event.detail.get("occurred_at")
        at = min(datetime.fromisoformat(occurred), event.created_at) if occurred else event.created_at
        notification = event.delivery.notification
        outcome = "unsubscribed" if event.status == "failed" and event.reason.startswith("opted out") else event.status
        key = (
            at.replace(second=0, microsecond=0),
            notification.tenant_id,
            notification.category_id,
            event.delivery.channel,
            event.delivery.priority,
            outcome,
        )
        counts[key] += 1
    return counts


def rolled_up_counts() -> Counter:
    counts: Counter = Counter()
    for row in DeliveryRollupMinute.objects.values(
        "bucket", "tenant_id", "category_id", "channel", "priority", "outcome"
    ).annotate(n=Sum("count")):
        counts[
            (row["bucket"], row["tenant_id"], row["category_id"], row["channel"], row["priority"], row["outcome"])
        ] += row["n"]
    return counts


def hour_totals_match_minutes() -> bool:
    minutes = dict(DeliveryRollupMinute.objects.values_list("outcome").annotate(n=Sum("count")).order_by())
    hours = dict(DeliveryRollupHour.objects.values_list("outcome").annotate(n=Sum("count")).order_by())
    return minutes == hours


def test_rollups_agree_with_the_history_after_a_real_run_and_late_feedback(workspace, workers):
    workers.start("critical", "normal")
    deliveries = [ingest_one(workspace, email=f"user{i}@example.com") for i in range(3)]
    deliveries.append(ingest_one(workspace, email="otp@example.com", category="otp"))
    wait_for(
        lambda: Delivery.objects.filter(pk__in=[d.pk for d in deliveries], status=DeliveryStatus.SENT).count() == 4,
        timeout=30,
        what="four deliveries sent through the sandbox",
    )

    assert rollups_advance(now=settled_now()) >= 1
    assert rolled_up_counts() == raw_counts()
    assert hour_totals_match_minutes()
    sent = DeliveryRollupMinute.objects.filter(outcome="sent")
    assert sent.aggregate(n=Sum("count"))["n"] == 4
    assert all(row.latency_bucket >= 0 for row in sent)
    assert {row.priority for row in sent} == {"normal", "critical"}

    # The provider reports two deliveries delivered after the run, stamped with an earlier time.
    occurred = timezone.now() - timedelta(minutes=3)
    for delivery in deliveries[:2]:
        assert feedback_receive(
            feedback=Feedback(
                delivery_id=str(delivery.pk),
                normalized_status="delivered",
                provider_status="postmark:Delivery",
                occurred_at=occurred,
                channel="email",
            ),
            address_for=EmailChannel().address_for,
        )
    rollups_advance(now=settled_now())
    assert rolled_up_counts() == raw_counts()
    delivered = DeliveryRollupMinute.objects.filter(outcome="delivered")
    assert [(row.bucket, row.count) for row in delivered] == [(occurred.replace(second=0, microsecond=0), 2)]
    assert hour_totals_match_minutes()

    # Running again counts nothing twice.
    rollups_advance(now=settled_now())
    assert rolled_up_counts() == raw_counts()

    # Minutes older than the minute views need are deleted; the hours stay.
    hours_before = DeliveryRollupHour.objects.aggregate(n=Sum("count"))["n"]
    rollups_advance(now=settled_now() + MINUTES_KEPT + timedelta(hours=1))
    assert not DeliveryRollupMinute.objects.exists()
    assert DeliveryRollupHour.objects.aggregate(n=Sum("count"))["n"] == hours_before


def test_an_hour_counts_every_minute_in_it(workspace):
    # The hours are summed from the minutes of the same run: rows in two minutes of one hour.
    delivery = ingest_one(workspace, email="hours@example.com")
    hour = (timezone.now() - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
    for minute in (10, 40, 40):
        DeliveryEvent.objects.create(
            delivery=delivery,
            status=DeliveryStatus.SENT,
            reason="accepted by the provider",
            attempt=1,
            detail={},
            created_at=hour + timedelta(minutes=minute),
        )
    rollups_advance()
    sent_minutes = DeliveryRollupMinute.objects.filter(outcome="sent").values_list("bucket").annotate(n=Sum("count"))
    assert dict(sent_minutes.order_by()) == {hour + timedelta(minutes=10): 1, hour + timedelta(minutes=40): 2}
    sent_hours = DeliveryRollupHour.objects.filter(outcome="sent").values_list("bucket").annotate(n=Sum("count"))
    assert dict(sent_hours.order_by()) == {hour: 3}
    assert hour_totals_match_minutes()


def test_rows_not_yet_settled_wait_for_a_later_run(workspace, workers):
    workers.start("normal")
    delivery = ingest_one(workspace)
    wait_for(lambda: Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.SENT, what="sent")

    rollups_advance(now=timezone.now())  # the history is younger than the settling time
    assert not DeliveryRollupMinute.objects.exists()
    horizon = RollupCursor.objects.get().counted_until
    assert horizon <= timezone.now() - timedelta(seconds=settings.NOTIFY_ROLLUP_SETTLE_SECONDS)

    rollups_advance(now=settled_now())
    assert rolled_up_counts() == raw_counts()


def test_the_rollups_lag_is_a_gauge(workspace, broker):
    from notify.observability.gauges import GAUGES_KEY, gauges_compute
    from notify.policy.caps import redis_client

    DeliveryEvent.objects.create(
        delivery=ingest_one(workspace), status="sent", created_at=timezone.now() - timedelta(minutes=10)
    )
    now = timezone.now()
    rollups_advance(now=now)
    assert gauges_compute(now=now, force=True)
    stored = json.loads(redis_client().get(GAUGES_KEY))
    [lag] = [value for name, _, value in stored if name == "notify_rollup_lag_seconds"]
    assert lag == pytest.approx(settings.NOTIFY_ROLLUP_SETTLE_SECONDS, abs=0.01)


@pytest.mark.usefixtures("webhooks")
def test_rollups_agree_after_the_providers_delivered_webhook(workspace, workers):
    workers.start("normal")
    delivery = ingest_one(workspace)
    wait_for(
        lambda: Delivery.objects.get(pk=delivery.pk).status in (DeliveryStatus.SENT, DeliveryStatus.DELIVERED),
        what="sent",
    )
    rollups_advance(now=settled_now())  # usually before the sandbox's webhook has come in
    wait_for(lambda: Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.DELIVERED, what="delivered")
    rollups_advance(now=settled_now())
    assert rolled_up_counts() == raw_counts()
    assert DeliveryRollupMinute.objects.get(outcome="delivered").count == 1


def test_feedback_counts_under_the_provider_account_that_sent_it(workspace, sandbox):
    """A bounce's own status holds a slash ("postmark:Bounce/HardBounce"): it is no account's
    name. Feedback counts under the account its delivery was sent through, and under none for
    the configured provider."""
    postmark(sandbox, name="postmark-eu", token="tenant-token", tenant=workspace.tenant)
    through_account = ingest_one(workspace, email="eu@example.com")
    assert deliveries_send(delivery_ids=due_now(through_account)) == 1
    Provider.objects.filter(tenant=workspace.tenant).delete()
    through_configured = ingest_one(workspace, email="default@example.com")
    assert deliveries_send(delivery_ids=due_now(through_configured)) == 1
    for delivery in (through_account, through_configured):
        assert feedback_receive(
            feedback=Feedback(
                delivery_id=str(delivery.pk),
                normalized_status="bounced",
                provider_status="postmark:Bounce/HardBounce",
                channel="email",
            ),
            address_for=EmailChannel().address_for,
        )
    rollups_advance(now=settled_now())
    counted: Counter = Counter()
    for provider, outcome, n in DeliveryRollupMinute.objects.values_list("provider", "outcome", "count"):
        counted[(provider, outcome)] += n
    assert counted == {
        ("", "queued"): 2,
        ("postmark-eu", "sent"): 1,
        ("postmark-eu", "bounced"): 1,
        ("", "sent"): 1,
        ("", "bounced"): 1,
    }
