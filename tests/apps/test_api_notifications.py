import json
from datetime import timedelta

from django.utils import timezone
from rest_framework.test import APIClient

from apps.deliveries.models import Delivery, DeliveryStatus
from tests.factories import ApiKeyFactory


def trigger(api: APIClient, category: str = "welcome", external_id: str = "ada", **extra: object) -> str:
    body = {"category": category, "recipient": {"external_id": external_id, "email": f"{external_id}@example.com"}}
    response = api.post("/api/v1/events", data=json.dumps({**body, **extra}), content_type="application/json")
    assert response.status_code == 202, response.content
    return response.json()["notification_ids"][0]


def test_read_one_notification_with_its_delivery_history(api, workspace):
    notification_id = trigger(api)
    body = api.get(f"/api/v1/notifications/{notification_id}").json()
    assert body["recipient"] == "ada"
    assert body["category"] == "welcome"
    assert body["status"] == "pending"
    [delivery] = body["deliveries"]
    assert delivery["status"] == "queued"
    assert [h["status"] for h in delivery["history"]] == ["queued"]


def test_list_filters_by_recipient_category_status_and_time(api, workspace):
    first = trigger(api, external_id="ada")
    second = trigger(api, category="otp", external_id="bob")
    Delivery.objects.filter(notification_id=second).update(status=DeliveryStatus.SENT)

    def ids(**params: str) -> list[str]:
        response = api.get("/api/v1/notifications", params)
        assert response.status_code == 200, response.content
        return [n["id"] for n in response.json()["results"]]

    assert ids() == [second, first]
    assert ids(recipient="ada") == [first]
    assert ids(category="otp") == [second]
    assert ids(status="sent") == [second]
    assert ids(created_after=(timezone.now() + timedelta(minutes=1)).isoformat()) == []
    assert ids(created_before=(timezone.now() + timedelta(minutes=1)).isoformat()) == [second, first]
    bad = api.get("/api/v1/notifications", {"status": "lost"})
    assert bad.status_code == 400 and "status" in bad.json()["error"]["fields"]


def test_cancel_before_sending_and_409_after(api, workspace):
    later = (timezone.now() + timedelta(hours=1)).isoformat()
    notification_id = trigger(api, send_at=later)
    response = api.post(f"/api/v1/notifications/{notification_id}/cancel")
    assert response.status_code == 200
    assert response.json() == {"cancelled_deliveries": 1}
    delivery = Delivery.objects.get(notification_id=notification_id)
    assert delivery.status == DeliveryStatus.CANCELLED
    assert list(delivery.events.values_list("status", flat=True)) == ["queued", "cancelled"]

    again = api.post(f"/api/v1/notifications/{notification_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "not_cancellable"


def test_another_tenants_notification_is_not_found(api, workspace):
    notification_id = trigger(api)
    stranger = APIClient()
    stranger.credentials(HTTP_AUTHORIZATION=f"Bearer {ApiKeyFactory().raw_key}")
    assert stranger.get(f"/api/v1/notifications/{notification_id}").status_code == 404
    assert stranger.post(f"/api/v1/notifications/{notification_id}/cancel").status_code == 404
    assert api.get("/api/v1/notifications/not-a-uuid").status_code == 404
