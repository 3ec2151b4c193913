from datetime import timedelta

import pytest
from django.utils import timezone

from apps.deliveries.models import DeadLetter, Delivery, DeliveryStatus
from notify.pipeline.control import channel_pause, channel_resume
from notify.pipeline.dispatch import publish, sweep
from notify.pipeline.send import deliveries_claim
from tests.helpers import metric_value, metrics_scrape
from tests.notify.test_send import ingest_one


def test_an_expired_lease_is_requeued_and_published(workspace, django_capture_on_commit_callbacks, metrics_token):
    delivery = ingest_one(workspace)
    deliveries_claim(delivery_ids=[str(delivery.pk)])
    later = timezone.now() + timedelta(seconds=5)  # past the 4 s test lease
    before = metric_value(metrics_scrape(), "notify_deliveries_total")
    with django_capture_on_commit_callbacks(execute=False) as published:
        report = sweep(now=later)
    assert report.leases_expired == 1
    # Not a state reached: the next attempt's outcome is counted.
    assert metric_value(metrics_scrape(), "notify_deliveries_total") == before
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.QUEUED
    assert delivery.lease_token is None
    assert delivery.events.last().reason.startswith("lease expired")
    assert len(published) == 1


def test_a_lease_that_keeps_expiring_ends_in_the_dead_letter_queue(workspace, metrics_token):
    delivery = ingest_one(workspace)
    deliveries_claim(delivery_ids=[str(delivery.pk)])
    Delivery.objects.filter(pk=delivery.pk).update(attempt_count=3)
    before = metrics_scrape()
    sweep(now=timezone.now() + timedelta(seconds=5))
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.DEAD
    assert DeadLetter.objects.get(delivery=delivery).reason == "worker lost during each of 3 attempts"
    # Counted as the send stage counts a dead letter, with the delivery's own labels.
    labels = {"channel": "email", "tenant": workspace.tenant.slug, "state": "dead"}
    after = metrics_scrape()
    assert (
        metric_value(after, "notify_deliveries_total", **labels)
        - metric_value(before, "notify_deliveries_total", **labels)
        == 1
    )


def test_critical_work_has_a_shorter_lease_so_a_lost_otp_is_requeued_sooner(workspace, settings):
    settings.NOTIFY_LEASE_SECONDS = 300
    settings.NOTIFY_CRITICAL_LEASE_SECONDS = 20
    otp, welcome = ingest_one(workspace, category="otp"), ingest_one(workspace)
    claimed_at = timezone.now()
    deliveries_claim(delivery_ids=[str(otp.pk), str(welcome.pk)])
    otp.refresh_from_db()
    welcome.refresh_from_db()
    assert otp.lease_expires_at - claimed_at == pytest.approx(timedelta(seconds=20), abs=timedelta(seconds=2))
    assert welcome.lease_expires_at - claimed_at == pytest.approx(timedelta(seconds=300), abs=timedelta(seconds=2))
    assert sweep(now=claimed_at + timedelta(seconds=25)).leases_expired == 1
    otp.refresh_from_db()
    assert otp.status == DeliveryStatus.QUEUED
    # The doubt began when it was claimed: the lease's start, by its own length.
    assert otp.in_doubt_since == pytest.approx(claimed_at, abs=timedelta(seconds=2))
    assert Delivery.objects.get(pk=welcome.pk).status == DeliveryStatus.SENDING


def test_a_live_lease_is_left_alone(workspace):
    delivery = ingest_one(workspace)
    deliveries_claim(delivery_ids=[str(delivery.pk)])
    assert sweep().leases_expired == 0


def test_stale_queued_work_is_published_again_and_fresh_work_is_not(
    workspace, broker, django_capture_on_commit_callbacks
):
    stale = ingest_one(workspace)
    now = timezone.now()
    with django_capture_on_commit_callbacks(execute=False) as published:
        assert sweep(now=now).republished == 0  # just published at ingest
    assert published == []
    with django_capture_on_commit_callbacks(execute=False) as published:
        assert sweep(now=now + timedelta(seconds=3)).republished == 1  # past the 2 s test threshold
    assert len(published) == 1
    stale.refresh_from_db()
    assert stale.published_at == now + timedelta(seconds=3)


def test_stale_work_behind_a_backlog_waits_until_its_queue_drains(workspace, broker):
    ingest_one(workspace)
    publish(channel="email", priority="normal", delivery_ids=["a-message-still-waiting"])
    later = timezone.now() + timedelta(seconds=3)
    assert sweep(now=later).republished == 0  # its message may be the one still queued
    broker.flushdb()  # the backlog (and everything else) is gone
    assert sweep(now=later).republished == 1


def test_scheduled_work_is_published_only_when_due(workspace, django_capture_on_commit_callbacks):
    delivery = ingest_one(workspace)
    due = timezone.now() + timedelta(hours=2)
    Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=due, published_at=None)
    assert sweep(now=due - timedelta(seconds=1)).republished == 0
    with django_capture_on_commit_callbacks(execute=False) as published:
        assert sweep(now=due).republished == 1
    assert len(published) == 1


@pytest.mark.django_db(transaction=True)
def test_resuming_a_paused_channel_publishes_each_held_delivery_once(api, workspace, settings, broker):
    settings.NOTIFY_SWEEP_CHUNK = 2  # several passes
    channel_pause(channel="email", reason="test")
    for n in range(5):
        api.post(
            "/api/v1/events",
            {"category": "welcome", "recipient": {"external_id": f"r{n}", "email": f"r{n}@example.com"}},
            format="json",
        )
    broker.flushdb()  # what planning published; the switch held them all the same
    assert channel_resume(channel="email") == 5
    assert broker.llen("email.normal") == 3  # 2 + 2 + 1, one task each pass
