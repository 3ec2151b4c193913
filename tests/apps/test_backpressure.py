"""Backpressure: with a channel's bulk queue over its backlog limit, bulk events are shed
(429 with Retry-After, or accepted for later) while critical and normal events still pass."""

import time

import pytest
from django.utils import timezone

from apps.deliveries.models import Delivery

pytestmark = pytest.mark.django_db(transaction=True)  # published on commit, to the real broker


@pytest.fixture
def backlog(api, workspace, broker, settings):  # type: ignore[no-untyped-def]
    """Two bulk task messages waiting (no worker runs here), over a limit of one."""
    settings.NOTIFY_BULK_BACKLOG_LIMIT = 1
    for n in range(2):
        assert event(api, "digest", f"r{n}").status_code == 202
    assert broker.llen("email.bulk") == 2
    time.sleep(1.1)  # past the one second the depths are remembered for
    return broker


def event(api, category: str, recipient: str = "ada"):  # type: ignore[no-untyped-def]
    body = {"category": category, "recipient": {"external_id": recipient, "email": f"{recipient}@example.com"}}
    return api.post("/api/v1/events", body, format="json")


def test_bulk_is_refused_with_retry_after_while_critical_and_normal_pass(api, backlog):
    refused = event(api, "digest")
    assert refused.status_code == 429
    assert refused["Retry-After"] == "30"
    assert refused.json()["error"]["code"] == "overloaded"
    assert event(api, "otp").status_code == 202
    assert event(api, "welcome").status_code == 202
    batch = api.post(
        "/api/v1/events/batch",
        {"events": [{"category": "welcome", "recipient": "ada"}, {"category": "digest", "recipient": "ada"}]},
        format="json",
    )
    assert batch.status_code == 429  # a batch is accepted or refused whole
    assert backlog.llen("email.bulk") == 2

    backlog.delete("email.bulk")  # the backlog drains
    time.sleep(1.1)
    assert event(api, "digest").status_code == 202


def test_bulk_can_be_accepted_for_later_instead(api, backlog, settings):
    settings.NOTIFY_BACKPRESSURE = "defer"
    accepted = event(api, "digest", "later")
    assert accepted.status_code == 202
    delivery = Delivery.objects.get(notification_id=accepted.json()["notification_ids"][0])
    assert 25 < (delivery.next_attempt_at - timezone.now()).total_seconds() <= 30


def test_a_recipient_over_its_limit_gets_429_naming_them(api, workspace, broker, settings):
    settings.NOTIFY_RECIPIENT_RATE_LIMIT = "2 per minute"
    assert [event(api, "otp").status_code for _ in range(2)] == [202, 202]
    refused = event(api, "otp")
    assert refused.status_code == 429
    assert refused.json()["error"]["fields"]["recipients"] == [
        "Recipient 'ada' has had 2 per minute events; retry later."
    ]
    assert 50 <= int(refused["Retry-After"]) <= 61
    assert event(api, "otp", "bo").status_code == 202  # someone else is not held back
