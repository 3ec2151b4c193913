"""The delivery guarantees, proven with real worker processes, Redis, PostgreSQL and the
sandbox. Each test starts the processes it needs."""

import json
import statistics
import time
from collections import Counter
from urllib.parse import urlparse

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from rest_framework.test import APIClient

from apps.deliveries.models import DeadLetter, Delivery, DeliveryEvent, DeliveryStatus
from notify.pipeline.send import RECORD_CHUNK
from tests.helpers import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


def trigger(api: APIClient, *, category: str, count: int = 1, prefix: str = "r", email: str | None = None) -> list[str]:
    recipients = [{"external_id": f"{prefix}{i}", "email": email or f"{prefix}{i}@example.com"} for i in range(count)]
    response = api.post(
        "/api/v1/events",
        data=json.dumps({"category": category, "recipients": recipients, "data": {"name": "you"}}),
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    return response.json()["notification_ids"]


def statuses(notification_ids: list[str]) -> Counter[str]:
    return Counter(Delivery.objects.filter(notification_id__in=notification_ids).values_list("status", flat=True))


def wait_for_status(notification_ids: list[str], status: str, *, timeout: float = 60) -> None:
    wait_for(
        lambda: statuses(notification_ids)[status] == len(notification_ids),
        timeout=timeout,
        what=f"{len(notification_ids)} deliveries to be {status} (now {dict(statuses(notification_ids))})",
    )


def assert_each_accepted_exactly_once(sandbox, notification_ids: list[str]) -> None:  # type: ignore[no-untyped-def]
    delivery_ids = {
        str(i) for i in Delivery.objects.filter(notification_id__in=notification_ids).values_list("id", flat=True)
    }
    accepted = Counter(r["delivery_id"] for r in sandbox.requests_log() if r["outcome"] == "accepted")
    assert set(accepted) == delivery_ids
    assert set(accepted.values()) == {1}


def test_an_event_is_delivered_and_the_providers_feedback_recorded(api, workers, sandbox, live_server):
    port = urlparse(live_server.url).port
    sandbox.webhooks_set(postmark=f"http://sandbox:sandbox-webhook-secret@127.0.0.1:{port}/anymail/postmark/tracking/")
    workers.start("normal")
    [notification_id] = trigger(api, category="welcome")
    wait_for_status([notification_id], DeliveryStatus.DELIVERED, timeout=30)
    delivery = Delivery.objects.get(notification_id=notification_id)
    assert list(delivery.events.values_list("status", flat=True)) == ["queued", "sent", "delivered"]
    assert delivery.events.last().detail["provider_status"] == "postmark:Delivery"
    [request] = sandbox.requests_log()
    assert request["to"] == "r0@example.com"
    assert request["subject"] == "Hello you"


def test_a_transient_failure_is_retried_then_succeeds(api, workers, sandbox):
    sandbox.faults_set(fail_next=[503, 503])
    workers.start("critical")
    [notification_id] = trigger(api, category="otp")
    wait_for_status([notification_id], DeliveryStatus.SENT)
    delivery = Delivery.objects.get(notification_id=notification_id)
    assert delivery.attempt_count == 3
    assert list(delivery.events.values_list("status", flat=True)) == ["queued", "retrying", "retrying", "sent"]
    assert [r["status"] for r in sandbox.requests_log()] == [503, 503, 200]


def test_a_permanent_failure_is_not_retried(api, workers, sandbox):
    sandbox.faults_set(address_status={"@rejected.test": 422})
    workers.start("critical")
    [notification_id] = trigger(api, category="otp", email="someone@rejected.test")
    wait_for_status([notification_id], DeliveryStatus.FAILED)
    time.sleep(1.5)  # longer than a retry would take under the test backoff
    assert len(sandbox.requests_log()) == 1
    assert Delivery.objects.get(notification_id=notification_id).attempt_count == 1


def test_exhausted_retries_become_a_dead_letter_and_an_admin_replay_delivers(api, workers, sandbox):
    sandbox.faults_set(address_status={"@down.test": 500})
    workers.start("critical")
    maintenance = workers.start("maintenance")
    [notification_id] = trigger(api, category="otp", email="someone@down.test")
    wait_for_status([notification_id], DeliveryStatus.DEAD)
    dead_letter = DeadLetter.objects.get(delivery__notification_id=notification_id)
    assert dead_letter.attempts == 3
    assert [r["status"] for r in sandbox.requests_log()] == [500, 500, 500]
    wait_for(lambda: f"delivery {dead_letter.delivery_id} on email is dead" in maintenance.log(), what="the DLQ notice")

    sandbox.faults_set()
    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("ops", "ops@example.com", "pw"))
    response = admin.post(
        "/admin/deliveries/deadletter/", {"action": "replay", "_selected_action": [dead_letter.pk]}, follow=True
    )
    assert b"Replayed 1 dead letter(s)" in response.content
    wait_for_status([notification_id], DeliveryStatus.SENT)
    history = list(Delivery.objects.get(notification_id=notification_id).events.values_list("status", "reason"))
    assert history[-2] == ("queued", "replayed from the dead-letter queue by ops")
    assert history[-1][0] == "sent"


def test_a_worker_killed_mid_batch_loses_and_duplicates_nothing(api, workers, sandbox, settings):
    # Two chunks, so two provider requests, a batch.
    settings.NOTIFY_BATCH_SIZE = {**settings.NOTIFY_BATCH_SIZE, "bulk": 2 * RECORD_CHUNK}
    sandbox.faults_set(latency_ms=400)
    doomed = workers.start("bulk")
    notification_ids = trigger(api, category="digest", count=4 * RECORD_CHUNK)
    # Kill it while the second chunk of the first batch is at the provider: the first chunk
    # is recorded as sent, the second reaches the provider but is never recorded.
    wait_for(lambda: sandbox.stats()["total"] >= RECORD_CHUNK, what="the first chunk to be accepted")
    time.sleep(0.15)
    doomed.kill()
    assert statuses(notification_ids)[DeliveryStatus.SENDING] == RECORD_CHUNK

    workers.start("bulk")
    workers.start("maintenance")
    workers.start_beat()
    wait_for_status(notification_ids, DeliveryStatus.SENT, timeout=90)
    assert_each_accepted_exactly_once(sandbox, notification_ids)
    assert sandbox.stats()["duplicates"]["postmark"] == 0
    assert DeliveryEvent.objects.filter(reason__startswith="lease expired").exists()
    # The killed chunk was either at the provider, and then found there rather than sent again,
    # or not yet sent (a slow machine records the first chunk for longer): all of it, or none.
    found = DeliveryEvent.objects.filter(reason__startswith="found at the provider").count()
    assert found in (0, RECORD_CHUNK)


def test_a_redis_flush_mid_run_still_completes_every_delivery(api, workers, sandbox, broker):
    sandbox.faults_set(latency_ms=300)
    workers.start("bulk")
    workers.start("maintenance")
    workers.start_beat()
    notification_ids = trigger(api, category="digest", count=300)
    wait_for(lambda: sandbox.stats()["total"] >= 50, what="the run to be under way")
    # Every key of the service (broker, caps, limits, circuits) is in this one database, so
    # flushing it is what a FLUSHALL does to the service; other test processes' databases stay.
    broker.flushdb()
    wait_for_status(notification_ids, DeliveryStatus.SENT, timeout=90)
    assert_each_accepted_exactly_once(sandbox, notification_ids)


def test_critical_work_does_not_wait_behind_a_bulk_backlog(api, workers, sandbox):
    sandbox.faults_set(latency_ms=100)  # per provider request: a bulk batch of 50 is one request
    workers.start("bulk")
    workers.start("critical")
    bulk_ids = trigger(api, category="digest", count=1000, prefix="b") + trigger(
        api, category="digest", count=1000, prefix="c"
    )
    latencies = []
    for i in range(10):
        started = time.monotonic()
        [critical_id] = trigger(api, category="otp", prefix=f"otp{i}-")
        wait_for_status([critical_id], DeliveryStatus.SENT, timeout=10)
        latencies.append(time.monotonic() - started)
    unsent_bulk = len(bulk_ids) - statuses(bulk_ids)[DeliveryStatus.SENT]
    print(
        f"critical latency while bulk drains: median {statistics.median(latencies) * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms; bulk still unsent: {unsent_bulk}"
    )
    assert unsent_bulk > 0, "the bulk backlog drained first, so the test proved nothing"


def _other_database_sessions() -> set[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        return {pid for (pid,) in cursor.fetchall()}


def test_a_worker_keeps_its_database_connection_from_task_to_task(api, workers, sandbox):
    before = _other_database_sessions()  # earlier tests' connections may still be closing
    workers.start("critical")
    sessions = []
    for i in range(3):
        [notification_id] = trigger(api, category="otp", prefix=f"otp{i}-")
        wait_for_status([notification_id], DeliveryStatus.SENT)
        sessions.append(_other_database_sessions() - before)
    # One connection, open between tasks and the same one each time: a new connection per
    # task would cost each critical send a PostgreSQL backend's start.
    assert len(sessions[0]) == 1
    assert sessions[0] == sessions[1] == sessions[2]
