"""The SMS budget and the frequency caps after Redis loses its counts: the day's spend is
rebuilt from the database and a cap window is seeded from it, so a loss never lets a limit
be passed. Real Redis (this run's own database, flushed as a loss would), PostgreSQL and the
sandbox's Twilio and Postmark."""

import threading
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from apps.catalog.models import CategoryKind, OverBudget
from apps.deliveries.models import Delivery, DeliveryStatus, Notification
from notify.policy.caps import budget_verdict, spend_rebuild
from notify.policy.rules import SEND
from tests.factories import CategoryFactory
from tests.notify.test_routing import ada, category, notify, send_queued  # noqa: F401 - ada: fixture
from tests.notify.test_send import send_now

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def texts(workspace, ada, broker, settings):  # type: ignore[no-untyped-def]  # noqa: F811
    """A category sent by SMS only, skipped past the tenant's budget of three one-segment texts."""
    settings.NOTIFY_SMS_SEGMENT_PRICE = "0.01"
    workspace.tenant.sms_daily_budget = Decimal("0.03")
    workspace.tenant.save()
    return category(workspace, channels=["sms"], over_budget=OverBudget.FALLBACK)


def spend_key(workspace) -> str:  # type: ignore[no-untyped-def]
    return f"notify:spend:sms:{workspace.tenant.id}:{timezone.now().astimezone(UTC).date().isoformat()}"


def accepted_texts(sandbox) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for r in sandbox.requests_log(provider="twilio") if r["outcome"] == "accepted")


def text_once(workspace) -> str:  # type: ignore[no-untyped-def]
    [delivery] = send_queued(notify(workspace))
    return delivery.status


def test_the_days_spend_is_rebuilt_from_the_database_after_a_flush(workspace, sandbox, texts, broker):
    assert [text_once(workspace) for _ in range(2)] == [DeliveryStatus.SENT] * 2
    broker.flushdb()  # Redis loses the day's spend and the once-per-delivery markers
    assert [text_once(workspace) for _ in range(3)] == [DeliveryStatus.SENT] + [DeliveryStatus.SUPPRESSED] * 2
    assert accepted_texts(sandbox) == 3  # the budget, not 2 + 3
    assert Decimal(broker.get(spend_key(workspace)).decode()) == Decimal("0.03")


def test_a_retry_after_a_flush_is_counted_once_against_the_rebuilt_spend(workspace, sandbox, texts, broker):
    assert text_once(workspace) == DeliveryStatus.SENT
    sandbox.faults_set(provider="twilio", fail_next=[503])
    [retried] = notify(workspace)
    assert send_queued([retried])[0].status == DeliveryStatus.RETRYING  # counted, then failed
    assert Decimal(broker.get(spend_key(workspace)).decode()) == Decimal("0.02")
    broker.flushdb()
    # Its marker is gone, and the rebuilt spend leaves it out (it was never sent): counted once.
    assert send_now(retried).status == DeliveryStatus.SENT
    assert Decimal(broker.get(spend_key(workspace)).decode()) == Decimal("0.02")
    assert [text_once(workspace) for _ in range(2)] == [DeliveryStatus.SENT, DeliveryStatus.SUPPRESSED]
    assert accepted_texts(sandbox) == 3


def test_the_rebuilt_spend_counts_what_was_sent_today_and_what_is_being_sent(workspace, sandbox, texts):
    critical = CategoryFactory(tenant=workspace.tenant, kind=CategoryKind.CRITICAL, default_channels=["sms"])

    def text(*, status: str, segments: int | None, sent_at: datetime | None = None, kind: str = "") -> Delivery:
        [delivery] = notify(workspace)
        if kind == CategoryKind.CRITICAL:
            Notification.objects.filter(pk=delivery.notification_id).update(category=critical)
        Delivery.objects.filter(pk=delivery.pk).update(status=status, segments=segments, sent_at=sent_at)
        return delivery

    now = timezone.now()
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    text(status=DeliveryStatus.DELIVERED, segments=2, sent_at=midnight + timedelta(seconds=1))  # counted: 2
    text(status=DeliveryStatus.SENDING, segments=1)  # in flight, noted before it was counted: 1
    text(status=DeliveryStatus.SENDING, segments=None)  # claimed, not yet counted: 0
    text(status=DeliveryStatus.SENT, segments=4, sent_at=midnight - timedelta(seconds=1))  # yesterday's
    text(status=DeliveryStatus.RETRYING, segments=1)  # failed: counted again on its retry
    text(status=DeliveryStatus.SUPPRESSED, segments=None)
    counting = text(status=DeliveryStatus.SENDING, segments=1)  # the one being counted now
    text(status=DeliveryStatus.SENT, segments=3, sent_at=now, kind=CategoryKind.CRITICAL)  # never budgeted
    spent = spend_rebuild(tenant=workspace.tenant, channel="sms", day=now.date(), delivery_id=counting.pk)
    assert spent == Decimal("0.03")


def test_workers_rebuilding_at_once_keep_one_total(workspace, texts, broker):
    """Eight threads, each with its own connections, find the day's spend missing at once."""
    workspace.tenant.sms_daily_budget = Decimal("100")
    [sent] = notify(workspace)
    Delivery.objects.filter(pk=sent.pk).update(status=DeliveryStatus.SENT, segments=5, sent_at=timezone.now())
    barrier = threading.Barrier(8)
    verdicts: list[bool] = []

    def count_one() -> None:
        barrier.wait()
        verdict = budget_verdict(
            tenant=workspace.tenant, category=texts, channel="sms", cost=Decimal("0.01"), delivery_id=uuid.uuid4()
        )
        verdicts.append(verdict == SEND)
        connection.close()

    threads = [threading.Thread(target=count_one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert verdicts == [True] * 8
    # The rebuilt 0.05 once, plus eight texts: a second rebuild kept would make it 0.10 or more.
    assert Decimal(broker.get(spend_key(workspace)).decode()) == Decimal("0.13")


def test_a_text_refused_by_the_budget_is_not_left_noted_as_spending(workspace, sandbox, texts, broker):
    texts.over_budget = OverBudget.HOLD
    texts.save()
    assert [text_once(workspace) for _ in range(3)] == [DeliveryStatus.SENT] * 3
    [held] = send_queued(notify(workspace))
    assert held.status == DeliveryStatus.DEFERRED
    assert held.segments is None  # so a rebuild while it is claimed again does not count it


def test_a_frequency_cap_is_seeded_from_the_database_after_a_flush(workspace, sandbox, ada, broker):  # noqa: F811
    capped = category(workspace, channels=["email"], frequency_cap="3 per hour")
    sent = [send_queued(notify(workspace))[0].status for _ in range(2)]
    assert sent == [DeliveryStatus.SENT] * 2
    broker.flushdb()
    after = [send_queued(notify(workspace))[0].status for _ in range(3)]
    assert after == [DeliveryStatus.SENT, DeliveryStatus.SUPPRESSED, DeliveryStatus.SUPPRESSED]
    assert len(sandbox.requests_log(provider="postmark")) == 3  # the cap, not 2 + 3
    # The tenant's cap counts every non-critical category together, seeded the same way.
    capped.frequency_cap = ""
    capped.save()
    workspace.tenant.frequency_cap = "4 per day"
    workspace.tenant.save()
    broker.flushdb()
    after = [send_queued(notify(workspace))[0].status for _ in range(2)]
    assert after == [DeliveryStatus.SENT, DeliveryStatus.SUPPRESSED]
    assert len(sandbox.requests_log(provider="postmark")) == 4


def test_a_retry_after_a_flush_takes_one_place_in_the_seeded_cap(workspace, sandbox, ada, broker):  # noqa: F811
    category(workspace, channels=["email"], frequency_cap="2 per hour")
    assert send_queued(notify(workspace))[0].status == DeliveryStatus.SENT
    sandbox.faults_set(fail_next=[503])
    [retried] = notify(workspace)
    assert send_queued([retried])[0].status == DeliveryStatus.RETRYING  # took its place, then failed
    broker.flushdb()
    # The seed holds the one sent; the retry, never sent, takes the second place once.
    assert send_now(retried).status == DeliveryStatus.SENT
    assert send_queued(notify(workspace))[0].status == DeliveryStatus.SUPPRESSED
    assert [r["outcome"] for r in sandbox.requests_log(provider="postmark")].count("accepted") == 2
