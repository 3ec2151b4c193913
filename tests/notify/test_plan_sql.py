"""A broadcast planned in the database decides for each recipient what notifications_plan()
decides for them, row for row."""

import json

import pytest
from django.conf import settings

from apps.audiences.models import Broadcast
from apps.catalog.models import Routing, TemplateVariant
from apps.deliveries.models import Delivery, DeliveryEvent, DeliveryStatus, Notification
from apps.recipients.models import Device, Recipient
from notify.pipeline.broadcast import fan_out
from notify.pipeline.plan import LocalSendTime, notifications_plan
from notify.pipeline.plan_sql import sql_plannable
from notify.policy.suppression import suppression_add
from tests.factories import CategoryFactory, RecipientFactory

CHANNELS = ["email", "sms", "push", "inapp"]


@pytest.fixture
def news(workspace):  # type: ignore[no-untyped-def]
    category = CategoryFactory(tenant=workspace.tenant, key="news", default_channels=CHANNELS)
    version = category.template.current_version()
    for channel in CHANNELS[1:]:
        TemplateVariant.objects.create(version=version, channel=channel, locale="", title="News", body="Hi")
    tenant = workspace.tenant
    reachable = RecipientFactory(
        tenant=tenant, external_id="all-set", phone="+14155550100", locale="fr", timezone="Asia/Tokyo"
    )
    Device.objects.create(tenant=tenant, recipient=reachable, platform="android", token="t-1")
    unreachable = RecipientFactory(tenant=tenant, external_id="no-address", email="", locale="", timezone="UTC")
    Device.objects.create(tenant=tenant, recipient=unreachable, platform="android", token="t-2", active=False)
    RecipientFactory(tenant=tenant, external_id="suppressed", email="Bounced@Example.com", phone="+14155550101")
    suppression_add(
        tenant_id=tenant.id, channel="email", address="bounced@example.com", reason="hard bounce", source="test"
    )
    suppression_add(tenant_id=tenant.id, channel="sms", address="+1 415 555 0101", reason="STOP", source="test")
    return category


def _broadcast(api, body: dict) -> Broadcast:  # type: ignore[no-untyped-def, type-arg]
    response = api.post("/api/v1/broadcasts", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 202, response.content
    fan_out(broadcast_id=response.json()["id"])
    return Broadcast.objects.select_related("event__tenant", "category").get(pk=response.json()["id"])


def _saved(broadcast: Broadcast) -> tuple[set, set, set]:  # type: ignore[type-arg]
    notifications = {
        (n.recipient.external_id, n.locale, n.priority, n.send_at, n.template_version_id)
        for n in Notification.objects.filter(event=broadcast.event).select_related("recipient")
    }
    deliveries = {
        (
            d.notification.recipient.external_id,
            d.channel,
            d.priority,
            d.status,
            d.status_reason,
            d.next_attempt_at,
            d.published_at,
            d.step,
            d.escalation,
        )
        for d in Delivery.objects.filter(notification__event=broadcast.event).select_related("notification__recipient")
    }
    history = {
        (
            e.delivery.notification.recipient.external_id,
            e.delivery.channel,
            e.status,
            e.reason,
            e.attempt,
            str(e.detail),
        )
        for e in DeliveryEvent.objects.filter(delivery__notification__event=broadcast.event).select_related(
            "delivery__notification__recipient"
        )
    }
    return notifications, deliveries, history


def _expected(broadcast: Broadcast) -> tuple[set, set, set]:  # type: ignore[type-arg]
    """What notifications_plan() makes of the same recipients at the fan-out's moment."""
    assert broadcast.started_at is not None
    now = broadcast.started_at
    recipients = list(Recipient.objects.filter(tenant=broadcast.tenant).order_by("id"))
    plan = notifications_plan(
        event=broadcast.event,
        category=broadcast.category,
        recipients=recipients,
        priority_override=None,
        channels_override=None,
        send_at=broadcast.send_at,
        send_at_local=LocalSendTime.parse(broadcast.send_at_local) if broadcast.send_at_local else None,
        template_version=broadcast.template_version,
        now=now,
    )
    names = {r.id: r.external_id for r in recipients}
    by_notification = {n.id: names[n.recipient_id] for n in plan.notifications}
    by_delivery = {d.id: d for d in plan.deliveries}

    def published(delivery: Delivery) -> object:
        due = (delivery.next_attempt_at - now).total_seconds() <= settings.NOTIFY_COUNTDOWN_MAX_SECONDS
        return delivery.next_attempt_at if delivery.status == DeliveryStatus.QUEUED and due else None

    notifications = {
        (names[n.recipient_id], n.locale, n.priority, n.send_at, n.template_version_id) for n in plan.notifications
    }
    deliveries = {
        (
            by_notification[d.notification_id],
            d.channel,
            d.priority,
            d.status,
            d.status_reason,
            d.next_attempt_at,
            published(d),
            d.step,
            d.escalation,
        )
        for d in plan.deliveries
    }
    history = {
        (
            by_notification[by_delivery[row.delivery_id].notification_id],
            by_delivery[row.delivery_id].channel,
            row.status,
            row.reason,
            row.attempt,
            str(row.detail),
        )
        for row in plan.history
    }
    return notifications, deliveries, history


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="now"),
        pytest.param({"send_at_local": "09:00"}, id="next-nine-local"),
        pytest.param({"send_at_local": "2031-03-01T09:00"}, id="nine-local-on-a-day"),
    ],
)
def test_the_database_plans_each_recipient_as_the_planner_does(api, workspace, news, extra):
    assert sql_plannable(category=news)
    broadcast = _broadcast(api, {"category": "news", "audience": {"all": True}, **extra})
    saved = _saved(broadcast)
    expected = _expected(broadcast)
    assert len(saved[1]) == 3 * len(CHANNELS)
    assert saved == expected
    statuses = {(d[0], d[1]): d[3] for d in saved[1]}
    assert statuses[("no-address", "email")] == statuses[("no-address", "push")] == DeliveryStatus.SUPPRESSED
    assert statuses[("suppressed", "email")] == statuses[("suppressed", "sms")] == DeliveryStatus.SUPPRESSED
    assert statuses[("all-set", "push")] == statuses[("no-address", "inapp")] == DeliveryStatus.QUEUED


def test_a_fallback_category_is_planned_by_the_planner_with_the_same_outcome(api, workspace, news):
    news.routing = Routing.FALLBACK
    news.save(update_fields=["routing"])
    assert not sql_plannable(category=news)
    broadcast = _broadcast(api, {"category": "news", "audience": {"all": True}})
    saved = _saved(broadcast)
    assert saved == _expected(broadcast)
    assert {d[3] for d in saved[1]} >= {DeliveryStatus.STANDBY, DeliveryStatus.QUEUED}
