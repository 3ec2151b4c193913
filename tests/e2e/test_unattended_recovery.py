"""Faults that take away what only Redis or beat kept, while work is in flight, recovered with
no intervention: real worker processes, beat, Redis, PostgreSQL and the sandbox."""

import time
from decimal import Decimal

import pytest

from apps.catalog.models import OverBudget
from apps.deliveries.models import DeliveryStatus
from notify.pipeline.send import RECORD_CHUNK
from tests.e2e.test_delivery_guarantees import assert_each_accepted_exactly_once, statuses, trigger, wait_for_status
from tests.helpers import wait_for
from tests.notify.test_routing import category

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


def accepted(sandbox, *, provider: str) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for r in sandbox.requests_log(provider=provider) if r["outcome"] == "accepted")


def text(api, *, count: int, prefix: str) -> list[str]:  # type: ignore[no-untyped-def]
    recipients = [{"external_id": f"{prefix}{i}", "phone": f"+1415555{i:04d}"} for i in range(count)]
    response = api.post("/api/v1/events", {"category": "reach", "recipients": recipients, "data": {}}, format="json")
    assert response.status_code == 202, response.content
    return response.json()["notification_ids"]


def wait_until_settled(notification_ids: list[str], *, settled: set[str]) -> None:
    wait_for(
        lambda: sum(statuses(notification_ids)[s] for s in settled) == len(notification_ids),
        timeout=90,
        what=f"{len(notification_ids)} deliveries to settle (now {dict(statuses(notification_ids))})",
    )


def test_a_redis_flush_mid_run_does_not_let_the_sms_budget_be_overspent(api, workspace, workers, sandbox, broker):
    workspace.tenant.sms_daily_budget = Decimal("0.10")  # ten one-segment texts at 0.01
    workspace.tenant.save()
    category(workspace, channels=["sms"], over_budget=OverBudget.FALLBACK)
    # The tasks the flush takes are published again two seconds later, not two minutes.
    env = {"NOTIFY_SMS_SEGMENT_PRICE": "0.01", "NOTIFY_REPUBLISH_AFTER_SECONDS": "2"}
    workers.start("normal", env=env)
    workers.start("maintenance", env=env)
    workers.start_beat()
    first = text(api, count=4, prefix="a")
    wait_for_status(first, DeliveryStatus.SENT)

    sandbox.faults_set(provider="twilio", latency_ms=300)
    # One event each: each text is counted against the budget as its own task comes up.
    second = [text(api, count=1, prefix=f"b{i}-")[0] for i in range(12)]
    wait_for(lambda: accepted(sandbox, provider="twilio") >= 6, what="the second run to be under way")
    broker.flushdb()  # the day's spend, the markers and the queued tasks, gone mid-send
    wait_until_settled(second, settled={DeliveryStatus.SENT, DeliveryStatus.SUPPRESSED})
    # Exactly the budget: the rebuilt spend held what was sent and what was being sent.
    assert accepted(sandbox, provider="twilio") == 10
    assert statuses(first + second)[DeliveryStatus.SENT] == 10


def test_a_redis_flush_does_not_let_a_frequency_cap_be_passed(api, workspace, workers, sandbox, broker):
    category(workspace, channels=["email"], frequency_cap="3 per hour")
    workers.start("normal")
    workers.start("maintenance")
    workers.start_beat()
    before = [trigger(api, category="reach", prefix="ada", email="ada@example.com")[0] for _ in range(2)]
    wait_for_status(before, DeliveryStatus.SENT)
    broker.flushdb()
    after = [trigger(api, category="reach", prefix="ada", email="ada@example.com")[0] for _ in range(3)]
    wait_until_settled(after, settled={DeliveryStatus.SENT, DeliveryStatus.SUPPRESSED})
    assert accepted(sandbox, provider="postmark") == 3  # the cap, not 2 + 3
    assert statuses(after) == {DeliveryStatus.SENT: 1, DeliveryStatus.SUPPRESSED: 2}


def test_beat_killed_while_leases_and_retries_wait_on_it_recovers_when_started_again(api, workers, sandbox):
    # Retries wait in the database for the sweeper (as on RabbitMQ), never as broker countdowns.
    env = {"NOTIFY_COUNTDOWN_MAX_SECONDS": "0"}
    sandbox.faults_set(latency_ms=400)
    doomed = workers.start("bulk", env=env)
    workers.start("maintenance", env=env)
    beat = workers.start_beat()
    notification_ids = trigger(api, category="digest", count=4 * RECORD_CHUNK)
    wait_for(lambda: sandbox.stats()["total"] >= RECORD_CHUNK, what="the first chunk to be accepted")
    time.sleep(0.15)
    # Beat and the worker die together: a chunk is left leased by a dead worker.
    beat.kill()
    doomed.kill()
    assert statuses(notification_ids)[DeliveryStatus.SENDING] > 0

    sandbox.faults_set(latency_ms=50, fail_next=[503])  # the next chunk fails: a retry comes due
    workers.start("bulk", env=env)
    wait_for(lambda: statuses(notification_ids)[DeliveryStatus.RETRYING] > 0, what="a retry to be scheduled")
    time.sleep(6)  # past the lease and the retry's backoff: only the sweeper can move them now
    stranded = statuses(notification_ids)
    assert stranded[DeliveryStatus.SENDING] + stranded[DeliveryStatus.RETRYING] > 0, stranded

    workers.start_beat()
    wait_for_status(notification_ids, DeliveryStatus.SENT, timeout=90)
    assert_each_accepted_exactly_once(sandbox, notification_ids)
