"""A person's data rights through the API: the export holds every kind of data kept about
them, and the erase leaves none of it behind while an erased person who had unsubscribed
stays suppressed on the real send path."""

import json

import pytest
from django.apps import apps
from django.db import connection
from django.utils import timezone

from apps.audiences.models import Topic, TopicMembership
from apps.deliveries.models import Delivery, DeliveryEvent, DeliveryStatus, Event
from apps.inbox.models import InboxItem
from apps.ops.models import AuditEntry
from apps.recipients.models import HASHED_ADDRESS_PREFIX, Device, Recipient, Suppression, WebPushSubscription
from notify.pipeline.send import deliveries_send
from tests.factories import ApiKeyFactory

pytestmark = pytest.mark.django_db(transaction=True)

EMAIL = "ada.lovelace@example.com"
PHONE = "+14155550123"
NAME = "Augusta Ada King"
TOKEN = "device-token-of-ada-0123456789"
ENDPOINT = "https://push.example.com/send/ada-endpoint-42"


def event(api, *, recipient: dict | str, category: str = "welcome", data: dict | None = None) -> Delivery:  # type: ignore[no-untyped-def]
    body = {"category": category, "recipient": recipient, "data": data or {"order": "A-1"}}
    response = api.post("/api/v1/events", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 202, response.content
    return Delivery.objects.get(notification_id=response.json()["notification_ids"][0], channel="email")


def send(delivery: Delivery) -> Delivery:
    """Through the real send stage, to the sandbox's ESP."""
    Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
    deliveries_send(delivery_ids=[str(delivery.pk)])
    delivery.refresh_from_db()
    return delivery


@pytest.fixture
def ada(api, workspace, sandbox):  # type: ignore[no-untyped-def]
    """A person with one of every kind of data, who unsubscribed from email."""
    recipient = {"external_id": "ada", "email": EMAIL, "phone": PHONE, "attributes": {"name": NAME}}
    delivery = send(event(api, recipient=recipient, data={"name": NAME, "order": "A-1"}))
    assert delivery.status == DeliveryStatus.SENT
    DeliveryEvent.objects.create(
        delivery=delivery, status="delivered", detail={"to": EMAIL, "provider_status": "x"}, created_at=timezone.now()
    )
    person = Recipient.objects.get(tenant=workspace.tenant, external_id="ada")
    InboxItem.objects.create(recipient=person, delivery=delivery, title=f"Hello {NAME}", body="Your order A-1")
    Device.objects.create(tenant=workspace.tenant, recipient=person, platform="android", token=TOKEN)
    WebPushSubscription.objects.create(
        tenant=workspace.tenant, recipient=person, endpoint=ENDPOINT, p256dh="p" * 20, auth="a" * 16
    )
    topic = Topic.objects.create(tenant=workspace.tenant, key="news")
    TopicMembership.objects.create(topic=topic, recipient=person)
    api.put("/api/v1/recipients/ada/preferences", {"categories": {"welcome": {"email": False}}}, format="json")
    api.post("/api/v1/recipients/ada/consents", {"channel": "sms", "granted": True, "source": "signup"}, format="json")
    Suppression.objects.create(tenant=workspace.tenant, channel="sms", address=PHONE, reason="complaint", source="t")
    return person


def test_the_export_holds_every_kind_of_data(api, ada):
    response = api.get("/api/v1/recipients/ada/export")
    assert response.status_code == 200, response.content
    export = response.json()
    assert export["recipient"]["email"] == EMAIL and export["recipient"]["attributes"] == {"name": NAME}
    assert [d["token"] for d in export["devices"]] == [TOKEN]
    assert [s["endpoint"] for s in export["webpush_subscriptions"]] == [ENDPOINT]
    assert export["preferences"]["categories"] == {"welcome": {"email": False}}
    assert [(c["channel"], c["granted"]) for c in export["consents"]] == [("sms", True)]
    assert export["topics"] == ["news"]
    [notification] = export["notifications"]
    [delivery] = notification["deliveries"]
    assert delivery["status"] == "sent" and {"sent", "delivered"} <= {h["status"] for h in delivery["history"]}
    assert export["notifications_truncated"] is False
    assert [item["title"] for item in export["inbox_items"]] == [f"Hello {NAME}"]
    assert [(s["channel"], s["address"]) for s in export["suppressions"]] == [("sms", PHONE)]


def test_the_export_is_capped_and_says_so(api, ada, settings):
    settings.NOTIFY_EXPORT_MAX_NOTIFICATIONS = 1
    event(api, recipient="ada")
    export = api.get("/api/v1/recipients/ada/export").json()
    assert len(export["notifications"]) == 1 and export["notifications_truncated"] is True


def rows_mentioning(text: str) -> list[str]:
    """Every table of the project's apps whose rows mention the text anywhere, in any column."""
    found = []
    with connection.cursor() as cursor:
        for model in apps.get_models():
            if model._meta.app_label not in {
                "tenants",
                "catalog",
                "recipients",
                "deliveries",
                "inbox",
                "audiences",
                "ops",
            }:
                continue
            table = connection.ops.quote_name(model._meta.db_table)
            cursor.execute(f"SELECT count(*) FROM {table} t WHERE lower(t::text) LIKE %s", [f"%{text.lower()}%"])
            if cursor.fetchone()[0]:
                found.append(model._meta.label)
    return found


def test_erase_leaves_no_personal_data_and_is_idempotent(api, ada, workspace):
    assert rows_mentioning(EMAIL) and rows_mentioning(NAME)  # the scan sees them before
    delivery_ids = set(Delivery.objects.filter(notification__recipient=ada).values_list("id", flat=True))

    first = api.post("/api/v1/recipients/ada/erase")
    assert first.status_code == 200, first.content
    for personal in (EMAIL, PHONE, NAME, TOKEN, ENDPOINT):
        assert rows_mentioning(personal) == [], personal
    assert not Device.objects.filter(recipient=ada).exists()
    assert not WebPushSubscription.objects.filter(recipient=ada).exists()
    assert not TopicMembership.objects.filter(recipient=ada).exists()
    assert not InboxItem.objects.filter(recipient=ada).exists()
    # The counts stay: the deliveries remain, with their states, without personal data.
    assert set(Delivery.objects.filter(notification__recipient=ada).values_list("id", flat=True)) == delivery_ids
    assert Event.objects.filter(notifications__recipient=ada).values_list("data", flat=True)[0] == {}
    assert set(Suppression.objects.filter(tenant=workspace.tenant).values_list("channel", flat=True)) == {
        "email",
        "sms",
    }
    assert all(a.startswith(HASHED_ADDRESS_PREFIX) for a in Suppression.objects.values_list("address", flat=True))
    [erasure] = AuditEntry.objects.filter(action="erase")
    assert erasure.object_id == "ada" and erasure.actor_type == "api_key"

    audit_length = AuditEntry.objects.count()
    second = api.post("/api/v1/recipients/ada/erase")
    assert (second.status_code, second.json()) == (200, first.json())
    assert AuditEntry.objects.count() == audit_length


def test_an_erased_person_who_had_unsubscribed_stays_suppressed_on_the_send_path(api, ada, sandbox):
    accepted_before = len([r for r in sandbox.requests_log() if r["outcome"] == "accepted"])
    assert api.post("/api/v1/recipients/ada/erase").status_code == 200

    # The same address comes back, under another case and another external id.
    again = send(event(api, recipient={"external_id": "ada-2", "email": EMAIL.upper()}))
    assert again.status == DeliveryStatus.SUPPRESSED
    assert "unsubscribed, then erased" in again.status_reason
    # Someone else is sent to as ever, so the path itself works.
    other = send(event(api, recipient={"external_id": "bob", "email": "bob@example.com"}))
    assert other.status == DeliveryStatus.SENT
    accepted = [r for r in sandbox.requests_log() if r["outcome"] == "accepted"]
    assert len(accepted) == accepted_before + 1


def test_erase_needs_a_key_for_every_category_and_the_write_scope(api, ada, workspace):
    limited = ApiKeyFactory(tenant=workspace.tenant, categories=["welcome"], scopes=["recipients:write"])
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {limited.raw_key}")
    assert api.post("/api/v1/recipients/ada/erase").json()["error"]["code"] == "category_limited_key"
    reader = ApiKeyFactory(tenant=workspace.tenant, scopes=["recipients:read"])
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {reader.raw_key}")
    assert api.post("/api/v1/recipients/ada/erase").status_code == 403
    assert api.get("/api/v1/recipients/ada/export").status_code == 200
    assert api.get("/api/v1/recipients/nobody/export").status_code == 404
    assert Recipient.objects.get(pk=ada.pk).email == EMAIL
