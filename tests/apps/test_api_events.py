import json
import threading
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from apps.catalog.models import TemplateVariant
from apps.deliveries.models import Delivery, DeliveryEvent, DeliveryStatus, Event, Notification
from apps.recipients.models import Recipient
from tests.factories import RecipientFactory

EVENTS = "/api/v1/events"


def post(api: APIClient, body: object, path: str = EVENTS, **headers: str):  # type: ignore[no-untyped-def]
    return api.post(path, data=json.dumps(body), content_type="application/json", **headers)


def error_fields(response) -> dict:  # type: ignore[no-untyped-def]
    return response.json()["error"].get("fields", {})


def test_trigger_with_an_inline_recipient_upserts_and_queues(api, workspace):
    response = post(
        api,
        {
            "category": "welcome",
            "recipient": {"external_id": "ada", "email": "ada@example.com", "locale": "es-MX"},
            "data": {"name": "Ada"},
        },
    )
    assert response.status_code == 202
    body = response.json()
    assert len(body["notification_ids"]) == 1
    notification = Notification.objects.get(id=body["notification_ids"][0])
    assert notification.recipient.email == "ada@example.com"
    assert notification.locale == "es-MX"
    assert notification.template_version.number == 1
    delivery = notification.deliveries.get()
    assert (delivery.channel, delivery.priority, delivery.status) == ("email", "normal", DeliveryStatus.QUEUED)
    assert list(delivery.events.values_list("status", flat=True)) == ["queued"]


def test_trigger_for_a_list_notifies_each_recipient_once(api, workspace):
    for external_id in ("a", "b"):
        RecipientFactory(tenant=workspace.tenant, external_id=external_id)
    response = post(api, {"category": "digest", "recipients": ["a", "b", "a", {"external_id": "c", "email": "c@x.io"}]})
    assert response.status_code == 202
    notifications = Notification.objects.filter(id__in=response.json()["notification_ids"])
    assert sorted(n.recipient.external_id for n in notifications) == ["a", "b", "c"]
    assert {n.priority for n in notifications} == {"bulk"}


def test_an_inline_upsert_changes_only_the_fields_given(api, workspace):
    RecipientFactory(tenant=workspace.tenant, external_id="ada", email="old@example.com", phone="+14155550100")
    post(api, {"category": "welcome", "recipient": {"external_id": "ada", "email": "new@example.com"}})
    ada = Recipient.objects.get(tenant=workspace.tenant, external_id="ada")
    assert (ada.email, ada.phone) == ("new@example.com", "+14155550100")


def _row_version(external_id: str) -> tuple[int, datetime]:
    """The row's xmin (the transaction that wrote its current version) and updated_at."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT xmin::text::bigint, updated_at FROM recipients_recipient WHERE external_id = %s", [external_id]
        )
        return cursor.fetchone()


def test_an_inline_upsert_rewrites_only_recipients_whose_fields_changed(api, workspace):
    first = {"external_id": "ada", "email": "ada@example.com", "attributes": {"plan": "pro"}}
    other = {"external_id": "bob", "email": "bob@example.com"}
    assert post(api, {"category": "digest", "recipients": [first, other]}).status_code == 202
    ada = Recipient.objects.get(external_id="ada")
    # Fields not given take the model's defaults.
    assert (ada.timezone, ada.phone, ada.attributes) == ("UTC", "", {"plan": "pro"})
    ada_before, bob_before = _row_version("ada"), _row_version("bob")

    response = post(api, {"category": "digest", "recipients": [first, {**other, "email": "robert@example.com"}]})

    assert response.status_code == 202
    # Unchanged: the same row version, not rewritten; changed: a new version and updated_at.
    assert _row_version("ada") == ada_before
    bob_after = _row_version("bob")
    assert bob_after[0] != bob_before[0] and bob_after[1] > bob_before[1]
    assert Recipient.objects.get(external_id="bob").email == "robert@example.com"
    # Both are notified either way, each through its one row.
    notified = Notification.objects.filter(id__in=response.json()["notification_ids"])
    assert sorted(n.recipient_id for n in notified) == sorted(Recipient.objects.values_list("id", flat=True))


def test_overrides_priority_channels_and_send_at(api, workspace):
    send_at = timezone.now() + timedelta(hours=2)
    response = post(
        api,
        {
            "category": "welcome",
            "recipient": {"external_id": "ada", "email": "ada@example.com"},
            "priority": "critical",
            "channels": ["email"],
            "send_at": send_at.isoformat(),
        },
    )
    assert response.status_code == 202
    delivery = Delivery.objects.get(notification_id=response.json()["notification_ids"][0])
    assert delivery.priority == "critical"
    assert delivery.next_attempt_at == send_at
    # Two hours is past the broker-countdown limit: it waits in the database for the sweeper.
    assert delivery.published_at is None
    assert delivery.events.get().reason.startswith("scheduled for")


WORLD = {"tokyo": "Asia/Tokyo", "new-york": "America/New_York", "london": "Europe/London"}


def local_send(api, workspace, send_at_local: str) -> dict[str, datetime]:  # type: ignore[no-untyped-def]
    recipients = [{"external_id": name, "email": f"{name}@example.com", "timezone": tz} for name, tz in WORLD.items()]
    response = post(api, {"category": "welcome", "recipients": recipients, "send_at_local": send_at_local})
    assert response.status_code == 202, response.content
    deliveries = Delivery.objects.filter(notification_id__in=response.json()["notification_ids"])
    return {
        d.notification.recipient.external_id: d.next_attempt_at
        for d in deliveries.select_related("notification__recipient")
    }


def test_send_at_local_reaches_each_recipient_at_nine_in_their_own_timezone(api, workspace):
    before = timezone.now()
    due = local_send(api, workspace, "09:00")
    for name, zone in WORLD.items():
        local = due[name].astimezone(ZoneInfo(zone))
        assert (local.hour, local.minute) == (9, 0)
        assert timedelta(0) < due[name] - before <= timedelta(hours=24)  # the next 09:00 there


def test_send_at_local_on_a_given_day_follows_each_zones_offset_that_day(api, workspace):
    winter = local_send(api, workspace, "2027-01-15T09:00")
    assert winter == {
        "tokyo": datetime(2027, 1, 15, 0, 0, tzinfo=UTC),
        "new-york": datetime(2027, 1, 15, 14, 0, tzinfo=UTC),
        "london": datetime(2027, 1, 15, 9, 0, tzinfo=UTC),
    }
    summer = local_send(api, workspace, "2027-07-15T09:00")
    assert (summer["new-york"], summer["london"]) == (
        datetime(2027, 7, 15, 13, 0, tzinfo=UTC),  # EDT
        datetime(2027, 7, 15, 8, 0, tzinfo=UTC),  # BST
    )


@pytest.mark.parametrize(
    "body",
    [
        {"send_at_local": "9 in the morning"},
        {"send_at_local": "2027-01-15T09:00+01:00"},
        {"send_at_local": "09:00", "send_at": "2027-01-15T09:00:00Z"},
    ],
)
def test_a_bad_send_at_local_is_refused_by_name(api, workspace, body):
    response = post(api, {"category": "welcome", "recipient": "ada", **body})
    assert response.status_code == 400
    assert "send_at_local" in response.json()["error"]["fields"]


def test_a_recipient_without_an_address_is_suppressed_with_a_reason(api, workspace):
    response = post(api, {"category": "welcome", "recipient": {"external_id": "nomail"}})
    delivery = Delivery.objects.get(notification_id=response.json()["notification_ids"][0])
    assert delivery.status == DeliveryStatus.SUPPRESSED
    assert delivery.status_reason == "recipient has no email address"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"recipient": "ada"}, "category"),
        ({"category": "welcome"}, "recipients"),
        ({"category": "welcome", "recipient": "ada", "recipients": ["ada"]}, "recipients"),
        ({"category": "welcome", "recipients": []}, "recipients"),
        ({"category": "welcome", "recipient": 7}, "recipient"),
        ({"category": "welcome", "recipient": {"email": "a@b.io"}}, "recipient.external_id"),
        ({"category": "welcome", "recipients": ["x", {"external_id": "y", "email": "nope"}]}, "recipients[1].email"),
        ({"category": "welcome", "recipient": {"external_id": "y", "timezone": "Mars/Olympus"}}, "recipient.timezone"),
        ({"category": "welcome", "recipient": {"external_id": "y", "phone": "555"}}, "recipient.phone"),
        ({"category": "welcome", "recipient": "ada", "priority": "urgent"}, "priority"),
        ({"category": "welcome", "recipient": "ada", "channels": ["pigeon"]}, "channels[0]"),
        ({"category": "welcome", "recipient": "ada", "channels": ["email", "email"]}, "channels"),
        ({"category": "welcome", "recipient": "ada", "data": [1, 2]}, "data"),
        ({"category": "welcome", "recipient": "ada", "send_at": "next tuesday"}, "send_at"),
        ({"category": "welcome", "recipient": "ada", "idempotency_key": "k" * 300}, "idempotency_key"),
    ],
)
def test_each_bad_field_is_named_in_a_400(api, workspace, body, field):
    response = post(api, body)
    assert response.status_code == 400, response.content
    assert field in error_fields(response), response.json()
    assert not Event.objects.exists()


def test_more_than_1000_recipients_is_refused(api, workspace):
    response = post(api, {"category": "welcome", "recipients": [f"u{i}" for i in range(1001)]})
    assert response.status_code == 400
    assert "recipients" in error_fields(response)


def test_an_unknown_category_lists_the_valid_keys(api, workspace):
    response = post(api, {"category": "nope", "recipient": "ada"})
    assert response.status_code == 400
    message = error_fields(response)["category"][0]
    assert "Unknown category 'nope'" in message
    assert "digest, otp, welcome" in message


def test_an_unknown_recipient_id_is_named(api, workspace):
    RecipientFactory(tenant=workspace.tenant, external_id="known")
    response = post(api, {"category": "welcome", "recipients": ["known", "ghost"]})
    assert response.status_code == 400
    assert "Unknown recipient 'ghost'" in error_fields(response)["recipients[1]"][0]


def test_a_channel_without_template_content_is_refused(api, workspace):
    TemplateVariant.objects.filter(version__template=workspace.normal.template).delete()
    response = post(api, {"category": "welcome", "recipient": {"external_id": "ada", "email": "a@example.com"}})
    assert response.status_code == 400
    assert "channels" in error_fields(response)


def test_malformed_json_gets_a_400(api, workspace):
    response = api.post(EVENTS, data='{"category": "welcome",', content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_json"


def test_a_body_over_the_limit_gets_a_413(api, workspace, settings):
    body = {"category": "welcome", "recipient": "ada", "data": {"blob": "x" * (256 * 1024)}}
    response = post(api, body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert not Event.objects.exists()


def test_a_batch_is_accepted_or_refused_whole(api, workspace):
    good = {"category": "welcome", "recipient": {"external_id": "new-person", "email": "n@example.com"}}
    bad = {"category": "nope", "recipient": "new-person"}
    response = post(api, {"events": [good, bad]}, path=f"{EVENTS}/batch")
    assert response.status_code == 400
    assert "events[1].category" in error_fields(response)
    assert not Event.objects.exists()
    assert not Recipient.objects.filter(external_id="new-person").exists()

    response = post(api, {"events": [good, {**bad, "category": "otp"}]}, path=f"{EVENTS}/batch")
    assert response.status_code == 202
    assert len(response.json()["events"]) == 2
    assert Notification.objects.count() == 2


def test_a_planning_error_late_in_a_batch_leaves_no_partial_write(api, workspace):
    TemplateVariant.objects.filter(version__template=workspace.critical.template).delete()
    good = {"category": "welcome", "recipient": {"external_id": "p1", "email": "p1@example.com"}}
    response = post(api, {"events": [good, {"category": "otp", "recipient": "p1"}]}, path=f"{EVENTS}/batch")
    assert response.status_code == 400
    assert "events[1].channels" in error_fields(response)
    assert (Event.objects.count(), Notification.objects.count(), Delivery.objects.count()) == (0, 0, 0)
    assert not Recipient.objects.filter(external_id="p1").exists()


def test_the_same_key_and_body_returns_the_original_response(api, workspace):
    body = {
        "category": "welcome",
        "recipient": {"external_id": "ada", "email": "a@example.com"},
        "idempotency_key": "k1",
    }
    first = post(api, body)
    again = post(api, body)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert Event.objects.count() == 1 and Notification.objects.count() == 1


def test_the_header_key_works_and_a_different_body_gets_409(api, workspace):
    body = {"category": "welcome", "recipient": {"external_id": "ada", "email": "a@example.com"}}
    assert post(api, body, HTTP_IDEMPOTENCY_KEY="k2").status_code == 202
    conflict = post(api, {**body, "data": {"x": 1}}, HTTP_IDEMPOTENCY_KEY="k2")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_conflict"
    assert "different request body" in conflict.json()["error"]["message"]
    assert Event.objects.count() == 1


def test_keys_are_scoped_to_a_tenant(api, workspace):
    body = {
        "category": "welcome",
        "recipient": {"external_id": "ada", "email": "a@example.com"},
        "idempotency_key": "k",
    }
    post(api, body)
    Event.objects.update(tenant=__import__("tests.factories").factories.TenantFactory())
    assert post(api, body).status_code == 202
    assert Event.objects.count() == 2


def _concurrently(bodies: list[dict], auth_header: str) -> list:  # type: ignore[type-arg]
    barrier = threading.Barrier(len(bodies))
    responses: list = [None] * len(bodies)

    def send(index: int) -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=auth_header)
        barrier.wait()
        try:
            responses[index] = post(client, bodies[index])
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_with_one_key_create_exactly_one_event(workspace):
    body = {
        "category": "welcome",
        "recipients": [{"external_id": f"c{i}", "email": f"c{i}@example.com"} for i in range(50)],
        "idempotency_key": "race",
    }
    responses = _concurrently([body] * 8, workspace.auth_header)
    assert [r.status_code for r in responses] == [202] * 8
    assert len({json.dumps(r.json(), sort_keys=True) for r in responses}) == 1
    assert Event.objects.count() == 1
    assert Notification.objects.count() == 50
    assert sum(1 for r in responses if r.headers.get("Idempotent-Replayed")) == 7


@pytest.mark.django_db(transaction=True)
def test_concurrent_different_bodies_with_one_key_create_one_event_and_409s(workspace):
    bodies = [
        {"category": "welcome", "recipient": {"external_id": f"d{i}", "email": "d@example.com"}, "idempotency_key": "k"}
        for i in range(6)
    ]
    responses = _concurrently(bodies, workspace.auth_header)
    assert sorted(r.status_code for r in responses) == [202] + [409] * 5
    assert Event.objects.count() == 1
    assert DeliveryEvent.objects.count() == 1


def test_an_overlong_idempotency_header_is_named(api, workspace):
    response = post(api, {"category": "welcome", "recipient": "ada"}, HTTP_IDEMPOTENCY_KEY="k" * 256)
    assert response.status_code == 400
    assert "Idempotency-Key" in error_fields(response)


def test_a_batch_refuses_the_idempotency_header(api, workspace):
    body = {"events": [{"category": "welcome", "recipient": {"external_id": "a", "email": "a@example.com"}}]}
    response = post(api, body, path=f"{EVENTS}/batch", HTTP_IDEMPOTENCY_KEY="k")
    assert response.status_code == 400
    assert "Idempotency-Key" in error_fields(response)
    assert not Event.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {
                "category": "welcome",
                "recipient": {"external_id": "a", "email": "a@example.com"},
                "data": {"note": "a\u0000b"},
            },
            "data.note",
        ),
        (
            {"category": "welcome", "recipients": [{"external_id": "a", "attributes": {"x": ["ok", "\ud800"]}}]},
            "recipients[0].attributes.x[1]",
        ),
    ],
)
def test_text_the_database_cannot_store_is_refused(api, workspace, body, field):
    response = api.post(EVENTS, data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    assert field in error_fields(response)
    assert not Event.objects.exists()
