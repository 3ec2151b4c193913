"""Replace by key around a delivery that a worker holds (it is left to finish, and an in-app
send that comes after a later event's is recorded superseded instead of showing older news),
and in a broadcast's fan-out."""

import json

from apps.audiences.models import Broadcast, Topic, TopicMembership
from apps.deliveries.models import Delivery, DeliveryStatus
from apps.inbox.models import InboxItem
from notify.channels.base import OutboundMessage, RenderedContent
from notify.channels.inapp import InAppChannel
from notify.pipeline.broadcast import fan_out
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest
from notify.pipeline.record import outcomes_record
from notify.pipeline.send import deliveries_claim, deliveries_send
from tests.e2e.test_replace_by_key import ada, ride  # noqa: F401 - fixtures

KEY = "ride-7"


def in_app_delivery(workspace, text: str) -> Delivery:  # type: ignore[no-untyped-def]
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[
            EventRequest(
                category_key="ride",
                recipients=[RecipientRef(external_id="ada")],
                channels=["inapp"],
                data={"text": text},
                replace_key=KEY,
            )
        ],
    )
    return Delivery.objects.get(notification_id=result.response["notification_ids"][0])


def in_app_message(*, delivery: Delivery, recipient, body: str) -> OutboundMessage:  # type: ignore[no-untyped-def]
    """The in-app message a worker sends for the delivery."""
    return OutboundMessage(
        delivery_id=delivery.id,
        event_id=delivery.notification.event_id,
        address=str(recipient.id),
        content=RenderedContent(title="Your ride", body=body),
        category_key="ride",
        collapse_key=KEY,
    )


def test_a_delivery_being_sent_is_not_superseded_and_cannot_bring_older_news_back(workspace, ride, ada):  # noqa: F811
    older = in_app_delivery(workspace, "5 minutes")
    token, [claimed] = deliveries_claim(delivery_ids=[str(older.id)])  # a worker holds it now
    newer = in_app_delivery(workspace, "2 minutes")
    older.refresh_from_db()
    assert older.status == DeliveryStatus.SENDING  # left to finish
    deliveries_send(delivery_ids=[str(newer.id)])
    [item] = InboxItem.objects.filter(recipient=ada)
    assert (item.body, item.delivery_id) == ("2 minutes", newer.id)

    # The held send completes after the newer one: it finds its key's item showing later news.
    message = in_app_message(delivery=older, recipient=ada, body="5 minutes")
    [outcome] = InAppChannel().send_batch(messages=[message])
    assert outcome.withheld == DeliveryStatus.SUPERSEDED
    outcomes_record(lease_token=token, deliveries={older.id: claimed}, outcomes=[outcome])
    older.refresh_from_db()
    assert older.status == DeliveryStatus.SUPERSEDED
    [item] = InboxItem.objects.filter(recipient=ada)
    assert (item.body, item.delivery_id) == ("2 minutes", newer.id)


def test_a_repeat_of_the_newest_send_updates_its_own_item_again(workspace, ride, ada):  # noqa: F811
    first = in_app_delivery(workspace, "5 minutes")
    deliveries_send(delivery_ids=[str(first.id)])
    second = in_app_delivery(workspace, "2 minutes")
    deliveries_send(delivery_ids=[str(second.id)])
    message = in_app_message(delivery=second, recipient=ada, body="2 minutes")
    [outcome] = InAppChannel().send_batch(messages=[message])  # a send in doubt, sent again
    assert outcome.ok
    [item] = InboxItem.objects.filter(recipient=ada)
    assert (item.body, item.delivery_id) == ("2 minutes", second.id)
    assert Delivery.objects.get(id=first.id).status == DeliveryStatus.SENT


def test_a_broadcast_with_the_key_supersedes_each_reached_recipients_earlier_event(api, workspace, ride, ada):  # noqa: F811
    earlier = in_app_delivery(workspace, "Service restored at 10:00")
    topic = Topic.objects.create(tenant=workspace.tenant, key="riders")
    TopicMembership.objects.create(topic=topic, recipient=ada)
    body = {"category": "ride", "audience": {"topic": "riders"}, "data": {"text": "at 09:30"}, "replace_key": KEY}
    response = api.post("/api/v1/broadcasts", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 202, response.content
    fan_out(broadcast_id=response.json()["id"])
    broadcast = Broadcast.objects.get(id=response.json()["id"])
    assert broadcast.event.replace_key == KEY
    earlier.refresh_from_db()
    assert (earlier.status, earlier.status_reason) == ("superseded", f"superseded by event {broadcast.event_id}")
    planned = Delivery.objects.filter(notification__event_id=broadcast.event_id)
    assert sorted(d.status for d in planned) == ["queued"] * 3

    too_long = {**body, "replace_key": "k" * 201}
    refused = api.post("/api/v1/broadcasts", data=json.dumps(too_long), content_type="application/json")
    assert refused.status_code == 400
    assert list(refused.json()["error"]["fields"]) == ["replace_key"]
