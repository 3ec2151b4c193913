"""Retention: a tenant's expired events, notifications, deliveries, history and inbox items
are purged in batches, in-flight work is kept, and a drain running beside the purge still
sends every delivery exactly once."""

import json
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connections
from django.utils import timezone

from apps.deliveries.models import Delivery, DeliveryEvent, DeliveryStatus, Event, Notification
from apps.inbox.models import InboxItem
from apps.ops.models import RetentionPolicy
from apps.ops.retention import retention_cutoffs, retention_purge
from tests.factories import TenantFactory
from tests.helpers import wait_for

OLD = timedelta(days=40)


def trigger(api, *, count: int, prefix: str, category: str = "welcome") -> list[str]:  # type: ignore[no-untyped-def]
    recipients = [{"external_id": f"{prefix}{i}", "email": f"{prefix}{i}@example.com"} for i in range(count)]
    body = {"category": category, "recipients": recipients, "data": {"name": "you"}}
    response = api.post("/api/v1/events", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 202, response.content
    return response.json()["notification_ids"]


def age(notification_ids: list[str], *, by: timedelta, status: str | None = None) -> None:
    """Make the notifications (and their events) that old, their deliveries settled as `status`."""
    notifications = Notification.objects.filter(id__in=notification_ids)
    then = timezone.now() - by
    Event.objects.filter(notifications__in=notifications).update(created_at=then)
    notifications.update(created_at=then)
    if status:
        Delivery.objects.filter(notification__in=notifications).update(status=status)


def test_the_purge_deletes_expired_rows_in_batches_and_keeps_new_and_in_flight_ones(api, workspace, settings):
    settings.NOTIFY_RETENTION_BATCH, settings.NOTIFY_RETENTION_PAUSE_SECONDS = 4, 0
    RetentionPolicy.objects.create(tenant=workspace.tenant, retention_days=30)
    expired = trigger(api, count=10, prefix="old")
    age(expired, by=OLD, status=DeliveryStatus.DELIVERED)
    for delivery in Delivery.objects.filter(notification_id__in=expired):
        DeliveryEvent.objects.create(delivery=delivery, status="delivered", created_at=timezone.now() - OLD)
        InboxItem.objects.create(recipient_id=delivery.notification.recipient_id, delivery=delivery, title="old")
    in_flight = trigger(api, count=2, prefix="waiting")
    age(in_flight, by=OLD, status=DeliveryStatus.RETRYING)
    recent = trigger(api, count=3, prefix="new")
    age(recent, by=timedelta(days=29), status=DeliveryStatus.SENT)

    report = retention_purge(now=timezone.now())

    assert report.notifications == 10 and report.deliveries == 10
    assert report.batches >= 3  # 10 notifications, 4 a batch
    assert not Notification.objects.filter(id__in=expired).exists()
    assert not Delivery.objects.filter(notification_id__in=expired).exists()
    assert not DeliveryEvent.objects.filter(delivery__notification_id__in=expired).exists()
    assert not InboxItem.objects.exists()
    assert Notification.objects.filter(id__in=in_flight + recent).count() == 5
    # The expired notifications' event went with them; the others' events stay.
    assert report.events == 1
    assert Event.objects.count() == 2
    # A second run finds nothing more.
    again = retention_purge(now=timezone.now())
    assert (again.notifications, again.events) == (0, 0)


def test_the_installation_default_applies_unless_a_tenant_says_otherwise(db, settings):
    settings.NOTIFY_RETENTION_DAYS = 90
    default, short, forever = TenantFactory(), TenantFactory(), TenantFactory()
    RetentionPolicy.objects.create(tenant=short, retention_days=7)
    RetentionPolicy.objects.create(tenant=forever, retention_days=None)
    now = timezone.now()
    cutoffs = retention_cutoffs(now=now)
    assert cutoffs[default.pk] == now - timedelta(days=90)
    assert cutoffs[short.pk] == now - timedelta(days=7)
    assert forever.pk not in cutoffs
    settings.NOTIFY_RETENTION_DAYS = None
    assert set(retention_cutoffs(now=now)) == {short.pk}


def drain_seconds(notification_ids: list[str], *, started: float, timeout: float = 120) -> float:
    def sent() -> bool:
        statuses = Counter(
            Delivery.objects.filter(notification_id__in=notification_ids).values_list("status", flat=True)
        )
        return statuses[DeliveryStatus.SENT] == len(notification_ids)

    wait_for(sent, timeout=timeout, interval=0.05, what="the backlog to drain")
    return time.monotonic() - started


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_retention_purging_in_batches_while_a_drain_runs(api, workspace, workers, sandbox, broker, settings):
    settings.NOTIFY_RETENTION_BATCH, settings.NOTIFY_RETENTION_PAUSE_SECONDS = 100, 0.05
    RetentionPolicy.objects.create(tenant=workspace.tenant, retention_days=30)
    expired = [i for n in range(3) for i in trigger(api, count=1000, prefix=f"old{n}-", category="digest")]
    age(expired, by=OLD, status=DeliveryStatus.SENT)
    broker.flushdb()  # their send tasks: settled before any worker could take them
    workers.start("bulk")
    started = time.monotonic()
    baseline = trigger(api, count=500, prefix="base", category="digest")
    alone = drain_seconds(baseline, started=started)

    report: dict[str, object] = {}

    def purge() -> None:
        try:
            report["purge"] = retention_purge(now=timezone.now())
            report["finished"] = time.monotonic()
        finally:
            connections.close_all()

    purger = threading.Thread(target=purge)
    purger.start()
    started = time.monotonic()
    backlog = trigger(api, count=500, prefix="drain", category="digest")
    beside_purge = drain_seconds(backlog, started=started)
    purger.join(timeout=120)

    purged = report["purge"]
    assert purged.notifications == 3000 and purged.batches >= 30  # type: ignore[attr-defined]
    assert report["finished"] > started  # the purge was still running when the backlog came  # type: ignore[operator]
    assert not Notification.objects.filter(id__in=expired).exists()
    drained = Delivery.objects.filter(notification_id__in=baseline + backlog).values_list("id", flat=True)
    accepted = Counter(r["delivery_id"] for r in sandbox.requests_log() if r["outcome"] == "accepted")
    assert set(accepted) == {str(i) for i in drained} and set(accepted.values()) == {1}
    print(f"drain of 500: {500 / alone:.0f}/s alone, {500 / beside_purge:.0f}/s beside the purge")
