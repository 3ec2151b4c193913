"""Replace by key and collapse keys, with real workers, the real firebase-admin and pywebpush
clients and the sandbox's FCM and push service: a repeat or a newer message replaces what a
person sees instead of adding to it."""

import base64
import hashlib
import json
from typing import Any

import pytest
import requests
from websockets.sync.client import connect

from apps.catalog.models import Category, TemplateVariant, TemplateVersion
from apps.deliveries.models import Delivery, DeliveryEvent, DeliveryStatus, Event
from apps.inbox.models import InboxItem
from apps.recipients.models import Device, Recipient, WebPushSubscription
from notify.sandbox.client import browser_subscription_keys
from tests.e2e.test_inbox_e2e import Producer, authenticated, next_message
from tests.factories import CategoryFactory, RecipientFactory, TemplateFactory
from tests.helpers import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

CHANNELS = ["push", "webpush", "inapp"]
# Longer than APNs' 64 bytes, and with characters no web push Topic may hold: both hashed.
LONG_KEY = "ride 4242: the driver's arrival time, as it changes while the driver comes nearer to you"


@pytest.fixture
def ride(workspace) -> Category:  # type: ignore[no-untyped-def]
    """`ride`: an update sent by mobile push, web push and the in-app inbox."""
    template = TemplateFactory(tenant=workspace.tenant, key="ride")
    version = TemplateVersion.objects.create(template=template, number=1)
    for channel in CHANNELS:
        TemplateVariant.objects.create(
            version=version, channel=channel, title="Your ride", body="{{ data.text }}", link="/ride"
        )
    return CategoryFactory(tenant=workspace.tenant, key="ride", template=template, default_channels=CHANNELS)


@pytest.fixture
def ada(workspace, sandbox) -> Recipient:  # type: ignore[no-untyped-def]
    """A recipient with a phone and a browser subscribed."""
    recipient = RecipientFactory(tenant=workspace.tenant, external_id="ada")
    Device.objects.create(tenant=workspace.tenant, recipient=recipient, token="token-phone", platform="android")
    WebPushSubscription.objects.create(
        tenant=workspace.tenant,
        recipient=recipient,
        endpoint=f"{sandbox.base_url}/webpush/sub-laptop",
        **browser_subscription_keys(),
    )
    return recipient


def trigger(api, *, text: str, replace_key: str | None = None) -> tuple[str, dict[str, Delivery]]:  # type: ignore[no-untyped-def]
    """Post a ride event; its id and its deliveries by channel."""
    body: dict[str, Any] = {"category": "ride", "recipient": "ada", "data": {"text": text}}
    if replace_key is not None:
        body["replace_key"] = replace_key
    response = api.post("/api/v1/events", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 202, response.content
    [notification_id] = response.json()["notification_ids"]
    deliveries = {d.channel: d for d in Delivery.objects.filter(notification_id=notification_id)}
    return response.json()["event_id"], deliveries


def wait_until(deliveries: dict[str, Delivery], status: str) -> None:
    def reached() -> bool:
        return all(d.status == status for d in Delivery.objects.filter(id__in=[d.id for d in deliveries.values()]))

    wait_for(reached, timeout=60, what=f"{sorted(deliveries)} to be {status}")


def accepted(sandbox, provider: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    return [r for r in sandbox.requests_log(provider=provider) if r["outcome"] == "accepted"]


def test_push_and_web_push_carry_the_delivery_id_as_their_collapse_key(api, ride, ada, sandbox, workers):
    workers.start("normal")
    _, deliveries = trigger(api, text="Your driver is on the way")
    wait_until(deliveries, DeliveryStatus.SENT)
    [fcm] = accepted(sandbox, "fcm")
    push_id = str(deliveries["push"].id)
    assert fcm["collapse_key"] == push_id
    assert fcm["collapse"] == {"android_collapse_key": push_id, "android_tag": push_id, "apns_collapse_id": push_id}
    [webpush] = accepted(sandbox, "webpush")
    assert webpush["collapse_key"] == deliveries["webpush"].id.hex  # a uuid's 32 hex digits fit a Topic


def test_a_newer_event_supersedes_the_queued_one_and_the_provider_gets_one_send(api, ride, ada, sandbox, workers):
    # Both accepted before any worker runs: the first is still queued when the second comes.
    first_event, first = trigger(api, text="Your driver is 5 minutes away", replace_key=LONG_KEY)
    second_event, second = trigger(api, text="Your driver is 2 minutes away", replace_key=LONG_KEY)
    assert Event.objects.get(id=second_event).replace_key == LONG_KEY
    for delivery in Delivery.objects.filter(id__in=[d.id for d in first.values()]):
        assert delivery.status == DeliveryStatus.SUPERSEDED
        assert delivery.status_reason == f"superseded by event {second_event}"
    workers.start("normal")
    wait_until(second, DeliveryStatus.SENT)

    history = DeliveryEvent.objects.filter(delivery_id__in=[d.id for d in first.values()])
    assert sorted(history.values_list("status", "reason")) == sorted(
        [("queued", "planned"), ("superseded", f"superseded by event {second_event}")] * len(CHANNELS)
    )
    # The older deliveries were never claimed: the providers saw the newer one alone, under the key.
    assert not Delivery.objects.filter(id__in=[d.id for d in first.values()]).exclude(attempt_count=0).exists()
    [fcm] = accepted(sandbox, "fcm")
    assert fcm["text"] == "Your driver is 2 minutes away"
    assert fcm["collapse"] == {
        "android_collapse_key": LONG_KEY,
        "android_tag": LONG_KEY,
        "apns_collapse_id": hashlib.sha256(LONG_KEY.encode()).hexdigest(),
    }
    [webpush] = accepted(sandbox, "webpush")
    topic = base64.urlsafe_b64encode(hashlib.sha256(LONG_KEY.encode()).digest()).decode()[:32]
    assert webpush["collapse_key"] == topic
    [item] = InboxItem.objects.filter(recipient=ada)
    assert (item.body, item.delivery_id) == ("Your driver is 2 minutes away", second["inapp"].id)
    assert first_event != second_event


def test_a_sent_delivery_stays_sent_and_another_recipients_or_keys_are_untouched(api, ride, ada, sandbox, workers):
    workers.start("normal")
    _, sent = trigger(api, text="5 minutes", replace_key="ride-1")
    wait_until(sent, DeliveryStatus.SENT)
    workers.stop_all()
    _, other_key = trigger(api, text="your parcel", replace_key="parcel-1")
    _, newer = trigger(api, text="2 minutes", replace_key="ride-1")
    assert {d.status for d in Delivery.objects.filter(id__in=[d.id for d in sent.values()])} == {DeliveryStatus.SENT}
    assert {d.status for d in Delivery.objects.filter(id__in=[d.id for d in other_key.values()])} == {"queued"}
    workers.start("normal")
    wait_until({**{f"o{c}": d for c, d in other_key.items()}, **newer}, DeliveryStatus.SENT)
    # Two ride sends and one parcel send, each under its own key.
    assert sorted(r["collapse_key"] for r in accepted(sandbox, "fcm")) == ["parcel-1", "ride-1", "ride-1"]
    # Keys that fit a web push Topic travel as themselves.
    assert sorted(r["collapse_key"] for r in accepted(sandbox, "webpush")) == ["parcel-1", "ride-1", "ride-1"]


def test_the_in_app_item_is_updated_in_place_and_pushed_live(api, workspace, ride, ada, web_server, workers):
    workers.start("normal")
    producer = Producer(base_url=web_server, api_key=workspace.api_key.raw_key)
    token = producer.post("inbox-tokens", {"recipient": "ada"})["token"]
    with connect(f"{web_server.replace('http', 'ws')}/inbox/v1/ws") as socket:
        authenticated(socket, token)
        assert next_message(socket)["type"] == "hello"
        producer.post("events", {"category": "ride", "recipient": "ada", "data": {"text": "5"}, "replace_key": "r"})
        first = next_message(socket)
        assert (first["type"], first["item"]["body"]) == ("item", "5")
        assert next_message(socket)["counts"]["unread"] == 1
        # The person reads it; the next update makes it unread again, as the same item.
        response = requests.post(
            f"{web_server}/inbox/v1/items/{first['item']['id']}/read",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        while (message := next_message(socket))["type"] != "counts" or message["counts"]["unread"] != 0:
            pass
        producer.post("events", {"category": "ride", "recipient": "ada", "data": {"text": "2"}, "replace_key": "r"})
        updated = next_message(socket)
        assert (updated["type"], updated["item"]["id"], updated["item"]["body"]) == ("item", first["item"]["id"], "2")
        assert updated["item"]["read"] is False
        assert next_message(socket)["counts"]["unread"] == 1
    [item] = InboxItem.objects.filter(recipient=ada)
    newest = Delivery.objects.filter(channel="inapp").order_by("-id").first()
    assert newest is not None and item.delivery_id == newest.id


@pytest.mark.parametrize(
    ("replace_key", "problem"),
    [("x" * 201, "no more than 200"), (42, "valid string"), ("", "blank"), (None, "null")],
)
def test_a_bad_replace_key_is_refused_naming_the_field(api, ride, ada, replace_key, problem):
    body = {"category": "ride", "recipient": "ada", "replace_key": replace_key}
    response = api.post("/api/v1/events", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    [message] = response.json()["error"]["fields"]["replace_key"]
    assert problem in message
    batch = api.post("/api/v1/events/batch", data=json.dumps({"events": [body]}), content_type="application/json")
    assert batch.status_code == 400
    assert "events[0].replace_key" in batch.json()["error"]["fields"]
    assert not Event.objects.exists()


def test_the_sandbox_refuses_collapse_fields_the_real_services_refuse(sandbox):
    endpoint = f"{sandbox.base_url}/webpush/sub-x"
    headers = {"Authorization": "vapid t=x, k=y", "TTL": "60"}
    refused = requests.post(endpoint, data=b"x", headers={**headers, "Topic": "no spaces allowed"}, timeout=5)
    assert refused.status_code == 400
    assert requests.post(endpoint, data=b"x", headers={**headers, "Topic": "a" * 32}, timeout=5).status_code == 201
    assert requests.post(endpoint, data=b"x", headers={**headers, "Topic": "a" * 33}, timeout=5).status_code == 400
    fcm = f"{sandbox.base_url}/fcm/v1/projects/p/messages:send"
    message = {"token": "token-phone", "notification": {"title": "t", "body": "b"}}
    for collapse_id, status in (("a" * 65, 400), ("a" * 64, 200)):
        body = {"message": {**message, "apns": {"headers": {"apns-collapse-id": collapse_id}}}}
        answer = requests.post(fcm, json=body, headers={"Authorization": "Bearer sandbox-token"}, timeout=5)
        assert answer.status_code == status, answer.text
    assert [r["status"] for r in sandbox.requests_log(provider="fcm")] == [400, 200]
