"""Preferences, consent, quiet hours and caps as the send stage applies them: real anymail to
the sandbox, and the cap windows in the real Redis."""

import threading
import time
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from apps.catalog.models import CategoryKind, OverCap
from apps.deliveries.models import Delivery, DeliveryStatus
from apps.recipients.models import Recipient
from notify.policy.caps import CountersRebuilding, cap_take
from notify.policy.preferences import recipient_rules_many
from tests.notify.test_send import history, ingest_one, send_now

# Transactions really commit here, as a change and the next send do in production.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ada(workspace, broker) -> Recipient:  # type: ignore[no-untyped-def]
    # `broker` empties the test Redis: no cap windows from earlier tests.
    return Recipient.objects.create(tenant=workspace.tenant, external_id="ada", email="ada@example.com")


def notify_ada(workspace) -> Delivery:  # type: ignore[no-untyped-def]
    return send_now(ingest_one(workspace))


def test_an_opt_out_suppresses_with_its_reason_and_an_opt_in_restores(api, workspace, sandbox, ada):
    response = api.patch("/api/v1/recipients/ada/preferences", {"channels": {"email": False}}, format="json")
    assert response.status_code == 200
    delivery = notify_ada(workspace)
    assert delivery.status == DeliveryStatus.SUPPRESSED
    assert delivery.status_reason == "email is turned off by the recipient"
    assert history(delivery) == ["queued", "suppressed"]
    assert sandbox.requests_log() == []

    response = api.patch("/api/v1/recipients/ada/preferences", {"channels": {"email": None}}, format="json")
    assert response.json()["channels"] == {}
    assert notify_ada(workspace).status == DeliveryStatus.SENT


def test_the_very_next_notification_after_an_opt_out_is_not_sent(api, workspace, sandbox, ada):
    assert notify_ada(workspace).status == DeliveryStatus.SENT
    assert recipient_rules_many(recipients=[ada])[ada.id].categories == {}
    api.patch("/api/v1/recipients/ada/preferences", {"categories": {"welcome": {"email": False}}}, format="json")
    assert recipient_rules_many(recipients=[ada])[ada.id].categories == {"welcome": {"email": False}}
    delivery = notify_ada(workspace)
    assert delivery.status == DeliveryStatus.SUPPRESSED
    assert delivery.status_reason == "'welcome' on email is turned off by the recipient"
    assert len(sandbox.requests_log()) == 1


def test_marketing_needs_consent_which_is_as_easy_to_withdraw(api, workspace, sandbox, ada):
    workspace.normal.kind = CategoryKind.MARKETING
    workspace.normal.save()
    assert notify_ada(workspace).status_reason == "no marketing consent on email"

    grant = {"channel": "email", "granted": True, "source": "signup-form"}
    assert api.post("/api/v1/recipients/ada/consents", grant, format="json").status_code == 201
    assert notify_ada(workspace).status == DeliveryStatus.SENT

    withdraw = {"channel": "email", "granted": False, "source": "preference-center"}
    assert api.post("/api/v1/recipients/ada/consents", withdraw, format="json").status_code == 201
    assert notify_ada(workspace).status == DeliveryStatus.SUPPRESSED
    [standing] = api.get("/api/v1/recipients/ada/consents").json()
    assert (standing["granted"], standing["source"]) == (False, "preference-center")
    assert ada.consents.count() == 2  # the grant stays on record


def test_a_critical_category_reaches_a_paused_recipient(api, workspace, sandbox, ada):
    api.put("/api/v1/recipients/ada/preferences", {"paused": True}, format="json")
    assert notify_ada(workspace).status_reason == "the recipient paused all notifications"
    workspace.normal.kind = CategoryKind.CRITICAL
    workspace.normal.save()
    assert notify_ada(workspace).status == DeliveryStatus.SENT


def test_quiet_hours_defer_without_spending_an_attempt_and_the_delivery_goes_out_after(api, workspace, sandbox, ada):
    now = timezone.now().astimezone(timezone.get_fixed_timezone(0))
    start, end = (now - timedelta(hours=1)).strftime("%H:%M"), (now + timedelta(hours=1)).strftime("%H:%M")
    api.patch("/api/v1/recipients/ada/preferences", {"quiet_hours": {"start": start, "end": end}}, format="json")
    delivery = notify_ada(workspace)
    assert delivery.status == DeliveryStatus.DEFERRED
    assert delivery.status_reason.startswith("quiet hours until")
    assert delivery.attempt_count == 0
    assert timedelta(minutes=58) < delivery.next_attempt_at - timezone.now() <= timedelta(hours=1)
    assert sandbox.requests_log() == []

    api.patch("/api/v1/recipients/ada/preferences", {"quiet_hours": {}}, format="json")
    delivery = send_now(delivery)  # as the sweeper would, once it is due
    assert delivery.status == DeliveryStatus.SENT
    assert history(delivery) == ["queued", "deferred", "sent"]


def test_a_category_cap_suppresses_past_n_in_the_window(workspace, sandbox, ada):
    workspace.normal.frequency_cap = "2 per hour"
    workspace.normal.save()
    deliveries = [notify_ada(workspace) for _ in range(3)]
    assert [d.status for d in deliveries] == [DeliveryStatus.SENT, DeliveryStatus.SENT, DeliveryStatus.SUPPRESSED]
    assert deliveries[-1].status_reason == "frequency cap of 2 per hour for category 'welcome' on email reached"
    assert len(sandbox.requests_log()) == 2


def test_a_category_may_defer_past_its_cap_instead(workspace, sandbox, ada):
    workspace.normal.frequency_cap = "1 per hour"
    workspace.normal.over_cap = OverCap.DEFER
    workspace.normal.save()
    assert notify_ada(workspace).status == DeliveryStatus.SENT
    deferred = notify_ada(workspace)
    assert deferred.status == DeliveryStatus.DEFERRED
    assert timedelta(minutes=59) < deferred.next_attempt_at - timezone.now() <= timedelta(hours=1)
    # With an expiry shorter than the wait, it is dropped instead.
    workspace.normal.expire_after = timedelta(minutes=10)
    workspace.normal.save()
    assert notify_ada(workspace).status == DeliveryStatus.EXPIRED


def test_the_tenants_cap_counts_every_category_together(workspace, sandbox, ada):
    workspace.tenant.frequency_cap = "1 per day"
    workspace.tenant.save()
    assert notify_ada(workspace).status == DeliveryStatus.SENT
    other = send_now(ingest_one(workspace, category="digest"))
    assert other.status_reason == "frequency cap of 1 per day for all categories on email reached"


def test_a_cap_holds_under_concurrency(broker):
    """Twelve threads, each with its own Redis connection, race for a cap of five."""
    tenant_id, recipient_id = uuid.uuid4(), uuid.uuid4()
    results: list[bool] = []
    barrier = threading.Barrier(12)

    def take() -> None:
        barrier.wait()
        for _ in range(3):
            while True:
                try:
                    reached = cap_take(
                        tenant_id=tenant_id,
                        recipient_id=recipient_id,
                        channel="sms",
                        category_key="alerts",
                        category_cap="5 per minute",
                        tenant_cap="",
                        delivery_id=uuid.uuid4(),
                    )
                    break
                except CountersRebuilding:  # the first take seeds the empty Redis's window
                    time.sleep(0.01)
            results.append(reached is None)
        connection.close()

    threads = [threading.Thread(target=take) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 5
    assert len(results) == 36


def test_a_retried_delivery_keeps_its_place_in_the_cap(workspace, sandbox, ada):
    workspace.normal.frequency_cap = "1 per hour"
    workspace.normal.save()
    sandbox.faults_set(fail_next=[503])
    delivery = notify_ada(workspace)
    assert delivery.status == DeliveryStatus.RETRYING  # counted against the cap, then failed
    assert send_now(delivery).status == DeliveryStatus.SENT  # the retry is not a second send
    assert notify_ada(workspace).status == DeliveryStatus.SUPPRESSED  # the cap holds for others
