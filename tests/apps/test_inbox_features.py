"""The inbox features beyond the list: severity, tabs and filters by category, tag and state,
grouping, snooze (back live when its time comes), expiry, bounded counts and bulk actions,
from the producer's events API to the recipient's inbox API, on PostgreSQL."""

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections
from django.utils import timezone
from rest_framework.test import APIClient

from apps.catalog.models import Category
from apps.deliveries.models import Delivery, DeliveryEvent
from apps.inbox.live import inbox_snoozes_return
from apps.inbox.models import InboxItem
from apps.inbox.serializers import InboxItemSerializer, inbox_items_json
from apps.inbox.services import inbox_expired_purge
from apps.recipients.tokens import INBOX, PREFERENCES, recipient_token_issue, recipient_token_read
from notify.pipeline.send import deliveries_send
from notify.tasks import sweep
from tests.apps.test_inbox_live import connect, receive
from tests.factories import CategoryFactory, RecipientFactory
from tests.helpers import inbox_history_analyze, metric_value, metrics_scrape, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def post(api: APIClient, **fields: Any) -> list[Delivery]:
    """One event through the producer API to ada (unless told otherwise); its deliveries."""
    body = {"category": "mention", "recipient": "ada", "data": {"who": "Bo", "text": "hello"}, **fields}
    response = api.post("/api/v1/events", body, format="json")
    assert response.status_code == 202, response.json()
    return list(Delivery.objects.filter(notification_id__in=response.json()["notification_ids"]))


def send(api: APIClient, **fields: Any) -> list[Delivery]:
    """One event to ada (unless told otherwise), stored in her inbox."""
    deliveries = post(api, **fields)
    deliveries_send(delivery_ids=[str(d.pk) for d in deliveries])
    return deliveries


@pytest.fixture
def ada(workspace, inbox_category, broker):  # type: ignore[no-untyped-def]
    yield RecipientFactory(tenant=workspace.tenant, external_id="ada", locale="fr-CA")
    # These tests commit, so the API publishes send tasks no worker takes here: gone with them.
    broker.flushdb()


@pytest.fixture
def inbox(ada) -> APIClient:  # type: ignore[no-untyped-def]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {recipient_token_issue(purpose=INBOX, recipient_id=ada.id)}")
    return client


@pytest.fixture
def security_category(workspace, inbox_category) -> Category:  # type: ignore[no-untyped-def]
    """A second in-app category, of high severity, on the same template."""
    return CategoryFactory(
        tenant=workspace.tenant,
        key="security",
        template=inbox_category.template,
        default_channels=["inapp"],
        severity="high",
    )


def bodies(client: APIClient, **query: str) -> list[str]:
    response = client.get("/inbox/v1/items", query)
    assert response.status_code == 200, response.json()
    return [item["body"] for item in response.json()["results"]]


def test_the_badge_shows_the_highest_unread_severity_from_the_category_or_the_event(api, inbox, security_category):
    send(api, data={"who": "Bo", "text": "low"}, severity="low")
    assert inbox.get("/inbox/v1/counts").json()["severity"] == "low"
    send(api, data={"who": "Bo", "text": "normal"})  # the mention category's default: medium
    send(api, category="security", data={"who": "Bo", "text": "new sign-in"})
    assert inbox.get("/inbox/v1/counts").json() == {"unread": 3, "unseen": 3, "limit": 99, "severity": "high"}
    high = next(i for i in inbox.get("/inbox/v1/items").json()["results"] if i["body"] == "new sign-in")
    assert (high["severity"], high["category"]) == ("high", "security")

    inbox.post(f"/inbox/v1/items/{high['id']}/read")
    assert inbox.get("/inbox/v1/counts").json()["severity"] == "medium"
    inbox.post("/inbox/v1/items/read-all")
    assert inbox.get("/inbox/v1/counts").json()["severity"] is None

    refused = api.post(
        "/api/v1/events", {"category": "mention", "recipient": "ada", "severity": "urgent"}, format="json"
    )
    assert refused.status_code == 400 and "severity" in refused.json()["error"]["fields"]


def test_one_batch_of_several_events_gives_each_item_its_events_attributes(api, inbox, security_category):
    # As a sweep or a resume sends them: the deliveries of three events claimed in one batch.
    bodies_and_fields = [
        ("low", {"severity": "low", "tags": ["launch"]}),
        ("default", {}),
        ("sign-in", {"category": "security", "tags": ["account"]}),
    ]
    delivery_ids = [
        str(delivery.pk)
        for text, fields in bodies_and_fields
        for delivery in post(api, data={"who": "Bo", "text": text}, **fields)
    ]
    assert deliveries_send(delivery_ids=delivery_ids) == 3
    items = {item["body"]: item for item in inbox.get("/inbox/v1/items").json()["results"]}
    shown = {body: (item["category"], item["severity"], item["tags"]) for body, item in items.items()}
    assert shown == {
        "low": ("mention", "low", ["launch"]),
        "default": ("mention", "medium", []),
        "sign-in": ("security", "high", ["account"]),
    }


def test_tabs_filter_by_category_tag_and_state_with_their_own_counts(api, inbox, security_category):
    send(api, data={"who": "Bo", "text": "comment"}, tags=["comments", "launch"])
    send(api, data={"who": "Bo", "text": "review"}, tags=["reviews"])
    send(api, category="security", data={"who": "Bo", "text": "sign-in"})
    assert bodies(inbox, category="security") == ["sign-in"]
    assert bodies(inbox, category="mention") == ["review", "comment"]
    assert bodies(inbox, tag="launch") == ["comment"]
    assert inbox.get("/inbox/v1/counts", {"tag": "reviews"}).json()["unread"] == 1
    assert inbox.get("/inbox/v1/counts", {"category": "mention"}).json()["unread"] == 2

    [review] = [i for i in inbox.get("/inbox/v1/items").json()["results"] if i["body"] == "review"]
    assert review["tags"] == ["reviews"]
    inbox.post(f"/inbox/v1/items/{review['id']}/read")
    assert bodies(inbox, read="false") == ["sign-in", "comment"]
    assert bodies(inbox, read="true") == ["review"]
    assert inbox.get("/inbox/v1/counts", {"category": "mention"}).json()["unread"] == 1

    # Mark a whole tab read: the other tabs keep their unread items.
    assert inbox.post("/inbox/v1/items/read-all?category=mention").json() == {"updated": 1}
    assert inbox.get("/inbox/v1/counts").json()["unread"] == 1
    assert bodies(inbox, read="false") == ["sign-in"]

    # Bad input names its field.
    for query, field in (({"read": "maybe"}, "read"), ({"colour": "red"}, "colour")):
        answer = inbox.get("/inbox/v1/items", query)
        assert answer.status_code == 400 and field in answer.json()["error"]["fields"], answer.json()
    assert inbox.get("/inbox/v1/counts", {"archived": "true"}).status_code == 400
    refused = api.post("/api/v1/events", {"category": "mention", "recipient": "ada", "tags": ["a b"]}, format="json")
    assert refused.status_code == 400 and "tags" in str(refused.json()["error"]["fields"])


def test_archive_everything_read(api, inbox):
    for text in ("one", "two", "three"):
        send(api, data={"who": "Bo", "text": text})
    one = next(i for i in inbox.get("/inbox/v1/items").json()["results"] if i["body"] == "one")
    inbox.post(f"/inbox/v1/items/{one['id']}/read")
    assert inbox.post("/inbox/v1/items/archive-read").json() == {"updated": 1}
    assert bodies(inbox) == ["three", "two"]
    assert bodies(inbox, archived="true") == ["one"]


def test_events_with_one_group_key_form_one_item_and_reading_it_reads_the_group(api, inbox):
    for who in ("Ann", "Bo", "Cy", "Di"):
        send(api, data={"who": who, "text": f"{who} commented"}, group_key="doc-7", actor=who)
    send(api, data={"who": "Ed", "text": "unrelated"})
    grouped, other = _two(inbox)
    assert (grouped["body"], grouped["group_count"], grouped["actors"]) == ("Di commented", 4, ["Di", "Cy", "Bo"])
    assert other["group_count"] == 1
    assert inbox.get("/inbox/v1/counts").json()["unread"] == 2  # the group counts once

    inbox.post(f"/inbox/v1/items/{grouped['id']}/read")
    assert InboxItem.objects.filter(group_key="doc-7", read_at__isnull=True).count() == 0
    assert inbox.get("/inbox/v1/counts").json()["unread"] == 1
    # Each of the group's in-app deliveries counts as opened in the analytics.
    opened = Delivery.objects.filter(inbox_item__group_key="doc-7").values_list("status", flat=True)
    assert list(opened) == ["opened"] * 4

    # After the group was read, the next comment starts a new one.
    send(api, data={"who": "Fa", "text": "Fa commented"}, group_key="doc-7", actor="Fa")
    newest = inbox.get("/inbox/v1/items").json()["results"][0]
    assert (newest["body"], newest["group_count"], newest["read"]) == ("Fa commented", 1, False)


def _two(inbox: APIClient) -> list[dict[str, Any]]:
    """The grouped item and the other one, whatever their order."""
    results = inbox.get("/inbox/v1/items").json()["results"]
    assert len(results) == 2, [r["body"] for r in results]
    return sorted(results, key=lambda item: -item["group_count"])


def test_a_snoozed_item_leaves_the_list_and_comes_back_live_when_its_time_comes(api, inbox, ada):
    send(api, data={"who": "Bo", "text": "later"})
    send(api, data={"who": "Bo", "text": "now"})
    later = next(i for i in inbox.get("/inbox/v1/items").json()["results"] if i["body"] == "later")
    past = inbox.post(f"/inbox/v1/items/{later['id']}/snooze", {"until": "2020-01-01T00:00:00Z"}, format="json")
    assert past.status_code == 400 and "until" in past.json()["error"]["fields"]

    until = timezone.now() + timedelta(seconds=2)
    snoozed = inbox.post(f"/inbox/v1/items/{later['id']}/snooze", {"until": until.isoformat()}, format="json")
    assert snoozed.status_code == 200 and snoozed.json()["snoozed_until"]
    assert bodies(inbox) == ["now"]
    assert inbox.get("/inbox/v1/counts").json()["unread"] == 1
    assert inbox_snoozes_return(now=timezone.now()) == 0  # not yet

    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)

    async def scenario() -> None:
        tab = await connect(token)
        try:
            assert (await receive(tab))["type"] == "hello"
            await asyncio.sleep(max(0.0, (until - timezone.now()).total_seconds()))
            # Back in the list at its time, at the top, before anything is pushed (catch-up).
            assert await sync_to_async(bodies)(inbox) == ["later", "now"]
            assert await sync_to_async(inbox_snoozes_return)(now=timezone.now()) == 1
            pushed = await receive(tab)
            assert (pushed["type"], pushed["item"]["body"], pushed["item"]["snoozed_until"]) == ("item", "later", None)
            assert (await receive(tab))["counts"]["unread"] == 2
        finally:
            await tab.disconnect()
            await sync_to_async(connections.close_all)()

    asyncio.run(scenario())
    assert inbox_snoozes_return(now=timezone.now()) == 0  # once


def test_an_expired_item_disappears_and_is_purged_later(api, inbox, settings, metrics_token):
    expires_at = timezone.now() + timedelta(seconds=4)
    send(api, data={"who": "Bo", "text": "announcement"}, expires_at=expires_at.isoformat())
    send(api, data={"who": "Bo", "text": "stays"})
    assert bodies(inbox) == ["stays", "announcement"]
    wait_for(lambda: bodies(inbox) == ["stays"], timeout=10, what="the announcement to expire")
    assert inbox.get("/inbox/v1/counts").json()["unread"] == 1

    assert inbox_expired_purge(now=timezone.now()) == 0  # kept a while, not shown
    settings.NOTIFY_INBOX_EXPIRED_KEEP_SECONDS = 0
    purged_before = metric_value(metrics_scrape(), "notify_inbox_items_swept_total", action="purged")
    assert sweep()["inbox_items_purged"] == 1  # the sweeper's pass
    assert metric_value(metrics_scrape(), "notify_inbox_items_swept_total", action="purged") == purged_before + 1
    assert list(InboxItem.objects.values_list("body", flat=True)) == ["stays"]


def test_counts_are_bounded_and_read_through_an_index(api, inbox, ada, settings):
    api.post(
        "/api/v1/events/batch",
        {"events": [{"category": "mention", "recipient": "ada", "data": {"text": str(n)}} for n in range(12)]},
        format="json",
    )
    deliveries_send(delivery_ids=[str(pk) for pk in Delivery.objects.values_list("pk", flat=True)])
    assert inbox.get("/inbox/v1/counts").json()["unread"] == 12
    settings.NOTIFY_INBOX_COUNT_LIMIT = 9
    assert inbox.get("/inbox/v1/counts").json() == {"unread": 10, "unseen": 10, "limit": 9, "severity": "medium"}
    assert inbox.get("/inbox/v1/counts", {"category": "mention"}).json()["unread"] == 10

    # With 100,000 items a sequential scan would be ruinous: the plan must have an index.
    inbox_history_analyze(item=InboxItem.objects.filter(recipient=ada).first(), read=True)
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
        cursor.execute(
            "EXPLAIN SELECT count(*) FROM (SELECT 1 FROM inbox_inboxitem WHERE recipient_id = %s "
            "AND read_at IS NULL AND archived_at IS NULL AND NOT folded LIMIT 100) s",
            [ada.id],
        )
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("RESET enable_seqscan")
    assert "inbox_unread" in plan, plan


def test_the_widget_learns_the_locale_and_a_preference_center_link(inbox, ada):
    profile = inbox.get("/inbox/v1/profile").json()
    assert profile["locale"] == "fr-CA"
    token = profile["preferences_url"].rstrip("/").rsplit("/", 1)[-1]
    assert recipient_token_read(purpose=PREFERENCES, token=token).recipient_id == ada.id


def test_reading_an_item_opens_its_delivery_once_for_the_engagement_figures(api, inbox):
    """In-app has no provider to report opens: a read is the open, for the item, the items of
    its group, and everything "mark all read" reaches; reading again records nothing more."""
    grouped = [send(api, data={"who": who, "text": "c"}, group_key="doc-9", actor=who)[0] for who in ("Ann", "Bo")]
    [single] = send(api, data={"who": "Cy", "text": "alone"})
    [later, last] = send(api, data={"who": "Di", "text": "one"}) + send(api, data={"who": "Ed", "text": "two"})
    group_item = InboxItem.objects.get(delivery=grouped[-1])

    inbox.post(f"/inbox/v1/items/{group_item.id}/read")
    inbox.post(f"/inbox/v1/items/{group_item.id}/read")  # twice: still one open
    assert statuses(*grouped, single) == ["opened", "opened", "sent"]
    assert inbox.post("/inbox/v1/items/read-all").status_code == 200
    assert statuses(single, later, last) == ["opened", "opened", "opened"]
    opens = DeliveryEvent.objects.filter(status="opened", detail__provider_status="inapp:read")
    assert sorted(opens.values_list("delivery_id", flat=True)) == sorted(d.pk for d in (*grouped, single, later, last))


def statuses(*deliveries: Delivery) -> list[str]:
    by_id = dict(Delivery.objects.filter(pk__in=[d.pk for d in deliveries]).values_list("id", "status"))
    return [by_id[d.pk] for d in deliveries]


def test_pushed_items_have_the_shape_and_formats_of_the_api():
    """What the live push and the catch-up send (inbox_items_json) is what the inbox API
    shows (its serializer), field for field, whatever each item holds."""
    now = timezone.now()
    bare = InboxItem(title="t", body="b", created_at=now, sort_at=now)
    full = InboxItem(
        created_at=now - timedelta(microseconds=1),
        title="Bo mentioned you",
        body="Look",
        link="https://example.com/c/1",
        data={"n": 1, "nested": {"x": [1, 2]}},
        sort_at=now + timedelta(hours=1),
        snoozed_until=now + timedelta(hours=1),
        seen_at=now,
        read_at=now,
        archived_at=now,
        expires_at=now + timedelta(days=1, microseconds=1),
        category="mention",
        tags=["ops", "db"],
        severity=3,
        group_key="launch",
        group_count=3,
        actors=["Ann", "Bo"],
    )
    items = [bare, full]
    assert inbox_items_json(items=items) == [dict(InboxItemSerializer(item).data) for item in items]
    assert inbox_items_json(items=items)[1]["expires_at"].endswith("Z")
