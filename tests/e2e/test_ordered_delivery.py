"""Ordering per recipient with two real worker processes, Redis, PostgreSQL and the sandbox
failing some sends. No sweeper runs: what a held delivery waits for is the send stage
publishing it when the one before it finishes."""

import json
from collections import Counter

import pytest
from rest_framework.test import APIClient

from apps.catalog.models import Priority
from apps.deliveries.models import Delivery, DeliveryStatus
from tests.factories import CategoryFactory
from tests.helpers import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

EVENTS_EACH = 8


def chat_event(api: APIClient, *, external_id: str, number: int) -> str:
    response = api.post(
        "/api/v1/events",
        data=json.dumps(
            {
                "category": "chat",
                "recipients": [{"external_id": external_id, "email": f"{external_id}@example.com"}],
                "data": {"name": f"message {number}"},
            }
        ),
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    [notification_id] = response.json()["notification_ids"]
    return str(Delivery.objects.get(notification_id=notification_id).pk)


def accepted_keys(sandbox, *, to: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The delivery ids the sandbox accepted for one address, in arrival order."""
    log = sorted(sandbox.requests_log(), key=lambda r: r["seq"])
    return [r["delivery_id"] for r in log if r["outcome"] == "accepted" and to in r["to"]]


def test_an_ordered_category_reaches_each_recipient_in_event_order_through_retries(api, workspace, workers, sandbox):
    CategoryFactory(tenant=workspace.tenant, key="chat", default_priority=Priority.CRITICAL, ordered=True)
    # Enough attempts that ada's first message is still retrying while bob's all go out.
    env = {"NOTIFY_EMAIL_MAX_ATTEMPTS": "40"}
    workers.start("critical", env=env)
    workers.start("critical", env=env)
    sandbox.faults_set(address_status={"ada@example.com": 503})

    ada, bob = [], []
    for number in range(EVENTS_EACH):  # in quick succession, interleaved
        ada.append(chat_event(api, external_id="ada", number=number))
        bob.append(chat_event(api, external_id="bob", number=number))

    # Bob is never held behind ada's retries: all of his go while her first one is retrying.
    wait_for(
        lambda: Delivery.objects.filter(pk__in=bob, status=DeliveryStatus.SENT).count() == EVENTS_EACH,
        timeout=30,
        what="bob's messages to be sent",
    )
    wait_for(
        lambda: Delivery.objects.get(pk=ada[0]).attempt_count >= 2,
        timeout=30,
        what="ada's first message to be retried",
    )
    assert accepted_keys(sandbox, to="bob@example.com") == bob
    head = Delivery.objects.get(pk=ada[0])
    assert head.status in (DeliveryStatus.RETRYING, DeliveryStatus.SENDING)
    later = Counter(Delivery.objects.filter(pk__in=ada[1:]).values_list("status", "attempt_count"))
    assert later == {(DeliveryStatus.QUEUED, 0): EVENTS_EACH - 1}, later
    assert accepted_keys(sandbox, to="ada@example.com") == []

    # Ada's address recovers, but the next two requests fail, whichever of hers they carry.
    sandbox.faults_set(fail_next=[503, 503])
    wait_for(
        lambda: Delivery.objects.filter(pk__in=ada, status=DeliveryStatus.SENT).count() == EVENTS_EACH,
        timeout=60,
        what=f"ada's messages to be sent (now {Counter(Delivery.objects.filter(pk__in=ada).values_list('status', flat=True))})",
    )
    # In the order their events were accepted, each once.
    assert accepted_keys(sandbox, to="ada@example.com") == ada
    statuses = [r["status"] for r in sandbox.requests_log() if "ada@example.com" in r["to"]]
    assert statuses.count(503) >= 4  # the address rule's failures, then fail_next's two
