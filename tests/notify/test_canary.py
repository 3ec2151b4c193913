"""The synthetic canary: a real worker sends it through the sandbox; its runs record the time
to sent and to delivered, and become failed or late when the providers fail."""

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import pytest
from django.utils import timezone

from apps.deliveries.models import Delivery, Event, Notification
from apps.ops.models import CanaryRun, CanaryState
from apps.recipients.models import Device, Recipient
from apps.tenants.models import Tenant
from notify.observability.canary import (
    SYSTEM_TENANT_SLUG,
    canary_latest,
    canary_purge,
    canary_runs_settle,
    canary_tick,
)
from notify.observability.gauges import gauges_compute
from notify.sandbox.client import browser_subscription_keys
from tests.helpers import metric_value, metrics_scrape, wait_for

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def canary(settings, sandbox, live_server):  # type: ignore[no-untyped-def]
    """A canary on email (delivered through Postmark's webhook), push, web push and in-app."""
    port = urlparse(live_server.url).port
    sandbox.webhooks_set(postmark=f"http://sandbox:sandbox-webhook-secret@127.0.0.1:{port}/anymail/postmark/tracking/")
    settings.NOTIFY_CANARY_INTERVAL_SECONDS = 60
    settings.NOTIFY_CANARY_DEADLINE_SECONDS = 30
    settings.NOTIFY_CANARY_EMAIL = "canary@example.com"
    settings.NOTIFY_CANARY_PUSH_TOKEN = "canary-device-token"
    settings.NOTIFY_CANARY_WEBPUSH_SUBSCRIPTION = {
        "endpoint": f"{sandbox.base_url}/webpush/canary-browser",
        **browser_subscription_keys(),
    }
    settings.NOTIFY_CANARY_INAPP = True
    settings.NOTIFY_CANARY_DELIVERED_CHANNELS = ["email", "sms"]
    return sandbox


def settled_runs(*, expected: int) -> list[CanaryRun]:
    """Settle the open runs until `expected` runs have settled; return every run."""

    def settled() -> bool:
        canary_runs_settle(now=timezone.now())
        return CanaryRun.objects.filter(settled_at__isnull=False).count() >= expected

    wait_for(settled, timeout=30, interval=0.2, what=f"{expected} settled canary runs")
    return list(CanaryRun.objects.order_by("channel"))


@pytest.mark.django_db(transaction=True)
def test_a_canary_run_reaches_sent_and_delivered_and_records_its_latency(canary, workers, settings, metrics_token):
    workers.start("critical")
    report = canary_tick(now=timezone.now())
    assert report["started"] == 4

    runs = {run.channel: run for run in settled_runs(expected=4)}
    assert set(runs) == {"email", "push", "webpush", "inapp"}
    email = runs["email"]
    assert email.state == CanaryState.DELIVERED and email.succeeded
    assert 0 < email.sent_seconds <= email.delivered_seconds < 30
    assert email.delivered_at == email.delivery.events.get(status="delivered").created_at
    for channel in ("push", "webpush", "inapp"):
        run = runs[channel]
        assert run.state == CanaryState.SENT and run.succeeded, (channel, run.reason)
        assert 0 < run.sent_seconds < 30 and run.delivered_seconds is None

    # The canary went through the pipeline to the probe, in the system tenant only.
    system = Tenant.objects.get(slug=SYSTEM_TENANT_SLUG)
    assert Notification.objects.filter(tenant=system).count() == 4
    assert Notification.objects.exclude(tenant=system).count() == 0
    [email_sent] = [r for r in canary.requests_log(provider="postmark") if r["outcome"] == "accepted"]
    assert email_sent["to"] == "canary@example.com"
    assert [r["to"] for r in canary.requests_log(provider="fcm")] == ["canary-device-token"]

    results = {result.channel: result for result in canary_latest()}
    assert results["email"].success is True and results["email"].state == CanaryState.DELIVERED
    assert results["email"].delivered_seconds == email.delivered_seconds
    assert results["email"].last_success_at == email.started_at
    assert results["inapp"].sent_seconds == runs["inapp"].sent_seconds

    # Its results are metrics, computed by the gauges' periodic task.
    gauges_compute(force=True)
    text = metrics_scrape()
    assert metric_value(text, "notify_canary_success", channel="email") == 1
    assert metric_value(text, "notify_canary_seconds", channel="email", stage="delivered") == pytest.approx(
        email.delivered_seconds
    )
    assert metric_value(text, "notify_canary_last_success_timestamp_seconds", channel="push") == pytest.approx(
        runs["push"].started_at.timestamp()
    )

    # A second run reuses the system tenant and its probe, and sends to the probe's new token only.
    settings.NOTIFY_CANARY_PUSH_TOKEN = "canary-device-token-2"
    canary_tick(now=timezone.now())
    assert Tenant.objects.filter(slug=SYSTEM_TENANT_SLUG).count() == 1
    assert Recipient.objects.filter(tenant=system).count() == 1
    assert list(Device.objects.filter(tenant=system, active=True).values_list("token", flat=True)) == [
        "canary-device-token-2"
    ]
    assert CanaryRun.objects.count() == 8


@pytest.mark.django_db(transaction=True)
def test_a_canary_whose_provider_fails_every_send_fails_and_a_slow_one_is_late(
    canary, workers, settings, metrics_token
):
    settings.NOTIFY_CANARY_WEBPUSH_SUBSCRIPTION = None
    settings.NOTIFY_CANARY_INAPP = False
    settings.NOTIFY_CANARY_DEADLINE_SECONDS = 4
    canary.faults_set(provider="postmark", error_rate=1.0, error_status=503)
    canary.faults_set(provider="fcm", latency_ms=5000)
    workers.start("critical", concurrency=2)  # the slow push does not hold up the email's retries
    canary_tick(now=timezone.now())

    runs = {run.channel: run for run in settled_runs(expected=2)}
    email, push = runs["email"], runs["push"]
    # Retries ran out (three attempts, in the tests) well before the deadline.
    assert email.state == CanaryState.FAILED and not email.succeeded, email.reason
    assert email.reason.startswith("dead:")
    assert email.sent_at is None and email.delivered_at is None
    assert push.state == CanaryState.LATE and not push.succeeded
    assert push.reason.startswith("still sending after 4s")
    results = {result.channel: result for result in canary_latest()}
    assert results["email"].success is False and results["push"].success is False
    assert results["email"].last_success_at is None
    gauges_compute(force=True)
    assert 'notify_canary_success{channel="email"} 0.0' in metrics_scrape()


@pytest.mark.django_db(transaction=True)
def test_old_runs_and_their_notifications_are_purged_in_batches(canary, workers, settings):
    settings.NOTIFY_CANARY_KEEP_DAYS = 1
    workers.start("critical")
    canary_tick(now=timezone.now())
    settled_runs(expected=4)
    CanaryRun.objects.update(started_at=timezone.now() - timedelta(days=2))
    canary_tick(now=timezone.now())  # starts four more, purges the old four

    assert CanaryRun.objects.count() == 4
    assert Event.objects.count() == 4
    assert Delivery.objects.count() == 4
    assert canary_purge(now=timezone.now()) == 0


SCHEDULE_PRINT = (
    "import json, django; django.setup(); from django.conf import settings; "
    "print(json.dumps({k: v['schedule'].total_seconds() for k, v in settings.CELERY_BEAT_SCHEDULE.items()}))"
)


def settings_load(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCHEDULE_PRINT],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_beat_runs_the_canary_only_when_an_interval_is_set():
    assert "notify-canary" not in json.loads(settings_load(NOTIFY_CANARY_INTERVAL_SECONDS="0").stdout)
    schedule = json.loads(settings_load(NOTIFY_CANARY_INTERVAL_SECONDS="300").stdout)
    assert schedule["notify-canary"] == 300


def test_a_malformed_web_push_probe_subscription_is_refused_at_start_up():
    result = settings_load(NOTIFY_CANARY_WEBPUSH_SUBSCRIPTION='{"endpoint": "https://push.example.com/x"}')
    assert result.returncode != 0
    assert "NOTIFY_CANARY_WEBPUSH_SUBSCRIPTION is a browser's PushSubscription as JSON" in result.stderr
