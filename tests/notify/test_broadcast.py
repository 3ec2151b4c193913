"""Broadcast fan-out and controls, run in this process on the real database and broker."""

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from apps.audiences.models import (
    Broadcast,
    BroadcastChunk,
    BroadcastRecipient,
    BroadcastState,
    Segment,
    Topic,
    TopicMembership,
)
from apps.catalog.models import Priority
from apps.deliveries.models import Delivery, DeliveryStatus, Notification
from notify.pipeline.broadcast import (
    broadcast_pause,
    broadcast_resume,
    broadcast_roll_up,
    broadcasts_advance,
    cancel_finish,
    chunk_claim,
    chunk_fan_out,
    fan_out,
    fan_out_chunk,
    resume_publish,
)
from notify.pipeline.dispatch import sweep
from notify.pipeline.send import deliveries_claim
from tests.factories import ApiKeyFactory, RecipientFactory


def client_for(raw_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


def broadcast(api, body: dict, *, expect: int = 202) -> dict:  # type: ignore[no-untyped-def, type-arg]
    response = api.post("/api/v1/broadcasts", data=json.dumps(body), content_type="application/json")
    assert response.status_code == expect, response.content
    return response.json()


def topic_with(workspace, key: str, recipients: list) -> Topic:  # type: ignore[no-untyped-def, type-arg]
    topic = Topic.objects.create(tenant=workspace.tenant, key=key)
    TopicMembership.objects.bulk_create([TopicMembership(topic=topic, recipient=r) for r in recipients])
    return topic


def people(workspace, count: int, prefix: str = "p", **fields) -> list:  # type: ignore[no-untyped-def, type-arg]
    return [RecipientFactory(tenant=workspace.tenant, external_id=f"{prefix}{i}", **fields) for i in range(count)]


def reached(broadcast_id: str) -> list[str]:
    return sorted(
        Notification.objects.filter(event__broadcast__id=broadcast_id).values_list("recipient__external_id", flat=True)
    )


def test_a_topic_broadcast_with_an_exclusion_reaches_the_topic_less_the_excluded(api, workspace):
    everyone = people(workspace, 4)
    topic_with(workspace, "news", everyone)
    topic_with(workspace, "muted", everyone[:1])
    body = broadcast(api, {"category": "welcome", "audience": {"topic": "news", "exclude": {"topic": "muted"}}})
    assert body["state"] == "fanning_out"
    fan_out(broadcast_id=body["id"])
    assert reached(body["id"]) == ["p1", "p2", "p3"]
    row = Broadcast.objects.get(pk=body["id"])
    assert (row.state, row.audience_count, row.planned_count) == (BroadcastState.SENDING, 3, 3)
    # The broadcast's notifications hang off its one event and go through the ordinary pipeline.
    deliveries = Delivery.objects.filter(notification__event_id=row.event_id)
    assert {d.status for d in deliveries} == {DeliveryStatus.QUEUED}
    assert {d.priority for d in deliveries} == {Priority.NORMAL}


def test_a_segment_broadcast_and_an_all_broadcast(api, workspace):
    people(workspace, 2, prefix="es", locale="es-MX")
    people(workspace, 3, prefix="en", locale="en")
    Segment.objects.create(tenant=workspace.tenant, key="spanish", filter={"field": "locale", "prefix": "es"})
    spanish = broadcast(api, {"category": "welcome", "audience": {"segment": "spanish"}})
    everyone = broadcast(api, {"category": "welcome", "audience": {"all": True}})
    fan_out(broadcast_id=spanish["id"])
    fan_out(broadcast_id=everyone["id"])
    assert reached(spanish["id"]) == ["es0", "es1"]
    assert reached(everyone["id"]) == ["en0", "en1", "en2", "es0", "es1"]


def test_someone_in_two_topics_is_notified_once(api, workspace):
    both, only_a, only_b = people(workspace, 3)
    topic_with(workspace, "a", [both, only_a])
    topic_with(workspace, "b", [both, only_b])
    body = broadcast(api, {"category": "welcome", "audience": {"topics": ["a", "b"]}})
    fan_out(broadcast_id=body["id"])
    assert reached(body["id"]) == ["p0", "p1", "p2"]


def test_fan_out_goes_in_chunks_from_its_cursor_and_a_repeated_chunk_adds_nobody(api, workspace, settings):
    settings.NOTIFY_BROADCAST_CHUNK = 2
    people(workspace, 5)
    body = broadcast(api, {"category": "welcome", "audience": {"all": True}})
    assert fan_out_chunk(broadcast_id=body["id"]).planned == 2
    row = Broadcast.objects.get(pk=body["id"])
    assert row.claimed_count == 2 and row.cursor is not None and row.state == BroadcastState.FANNING_OUT
    # The planned chunk's count joins the broadcast's at the next claim.
    assert list(row.chunks.values_list("planned", flat=True)) == [2]
    # A chunk run again from an older cursor (a retried task) finds everyone reached already.
    Broadcast.objects.filter(pk=row.pk).update(cursor=None)
    assert fan_out_chunk(broadcast_id=body["id"]).planned == 0
    fan_out(broadcast_id=body["id"])
    assert reached(body["id"]) == ["p0", "p1", "p2", "p3", "p4"]
    assert BroadcastRecipient.objects.filter(broadcast_id=body["id"]).count() == 5


def test_chunks_are_planned_side_by_side_and_a_dead_tasks_chunk_is_taken_over(api, workspace, settings):
    settings.NOTIFY_BROADCAST_CHUNK = 2
    people(workspace, 5)
    body = broadcast(api, {"category": "welcome", "audience": {"all": True}})
    # Two tasks claim in turn: each gets its own range, the second starting where the first ends.
    dying = chunk_claim(broadcast_id=body["id"])
    living = chunk_claim(broadcast_id=body["id"])
    assert dying is not None and living is not None
    assert dying.chunk.after is None and living.chunk.after == dying.chunk.until
    assert (dying.chunk.position, living.chunk.position) == (0, 2)
    # The first task dies before planning; the second plans its chunk and the last one.
    assert chunk_fan_out(broadcast_id=body["id"], claim=living) == 2
    assert fan_out_chunk(broadcast_id=body["id"]).planned == 1
    # Then nothing is left that it may take while the dead task's lease runs: the fan-out
    # is not finished, and the counts of what was planned are in.
    assert fan_out_chunk(broadcast_id=body["id"]).done
    row = Broadcast.objects.get(pk=body["id"])
    assert (row.state, row.planned_count, row.claimed_count) == (BroadcastState.FANNING_OUT, 3, 5)
    assert reached(body["id"]) == ["p2", "p3", "p4"]

    # Once the lease has run out, the next fan-out takes the chunk over and finishes.
    BroadcastChunk.objects.filter(pk=dying.chunk.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert fan_out(broadcast_id=body["id"]) == 2
    row = Broadcast.objects.get(pk=body["id"])
    assert (row.state, row.planned_count, row.audience_count) == (BroadcastState.SENDING, 5, 5)
    assert reached(body["id"]) == ["p0", "p1", "p2", "p3", "p4"]
    assert not row.chunks.exists()
    # The dead task, were it only slow, plans nothing a second time.
    assert chunk_fan_out(broadcast_id=body["id"], claim=dying) == 0
    assert Notification.objects.filter(event__broadcast__id=body["id"]).count() == 5


def test_a_chunk_claimed_before_a_pause_waits_for_the_resume(api, workspace, settings):
    settings.NOTIFY_BROADCAST_CHUNK = 2
    people(workspace, 3)
    body = broadcast(api, {"category": "welcome", "audience": {"all": True}})
    claim = chunk_claim(broadcast_id=body["id"])
    assert claim is not None
    paused = broadcast_pause(broadcast=Broadcast.objects.get(pk=body["id"]))
    assert chunk_fan_out(broadcast_id=body["id"], claim=claim) == 0
    assert reached(body["id"]) == []
    # Left for whoever resumes: no lease to wait out.
    assert BroadcastChunk.objects.get(pk=claim.chunk.pk).lease_expires_at is None
    broadcast_resume(broadcast=paused)
    fan_out(broadcast_id=body["id"])
    assert reached(body["id"]) == ["p0", "p1", "p2"]
    assert Broadcast.objects.get(pk=body["id"]).state == BroadcastState.SENDING


def test_the_unique_pair_refuses_a_second_notification_for_a_recipient(api, workspace):
    from django.db import IntegrityError, transaction

    [person] = people(workspace, 1)
    body = broadcast(api, {"category": "welcome", "audience": {"all": True}})
    fan_out(broadcast_id=body["id"])
    with pytest.raises(IntegrityError), transaction.atomic():
        BroadcastRecipient.objects.create(broadcast_id=body["id"], recipient=person)


def test_an_idempotency_key_returns_the_same_broadcast(api, workspace):
    people(workspace, 1)
    request = {"category": "welcome", "audience": {"all": True}, "idempotency_key": "launch-1"}
    first = broadcast(api, request)
    response = api.post("/api/v1/broadcasts", data=json.dumps(request), content_type="application/json")
    assert response.status_code == 202
    assert response["Idempotent-Replayed"] == "true"
    assert response.json()["id"] == first["id"]
    conflict = broadcast(api, {**request, "data": {"other": 1}}, expect=409)
    assert "idempotency_key" in conflict["error"]["fields"]
    assert Broadcast.objects.count() == 1


@pytest.mark.parametrize(
    ("body", "bad_field"),
    [
        ({"category": "nope", "audience": {"all": True}}, "category"),
        ({"category": "welcome", "audience": {"topic": "missing"}}, "audience.topic"),
        ({"category": "welcome", "audience": {"segment": "missing"}}, "audience.segment"),
        ({"category": "welcome", "audience": {"all": False}}, "audience.all"),
        ({"category": "welcome", "audience": {"all": True, "exclude": {"topic": "x"}}}, "audience.exclude.topic"),
        ({"category": "welcome", "audience": {"all": True, "topic": "x"}}, "audience"),
        ({"category": "welcome", "audience": {"everyone": True}}, "audience.everyone"),
        ({"category": "welcome", "audience": {"all": True}, "send_at_local": "9 o'clock"}, "send_at_local"),
        (
            {"category": "welcome", "audience": {"all": True}, "max_per_second": 5, "spread_over_seconds": 60},
            "spread_over_seconds",
        ),
        ({"category": "welcome", "audience": {"all": True}, "max_per_second": 0}, "max_per_second"),
        (
            {"category": "welcome", "audience": {"all": True}, "send_at_local": "09:00", "max_per_second": 5},
            "max_per_second",
        ),
    ],
)
def test_a_bad_broadcast_is_refused_naming_the_field(api, workspace, body, bad_field):
    response = broadcast(api, body, expect=400)
    assert list(response["error"]["fields"]) == [bad_field]
    assert not Broadcast.objects.exists()


def test_a_paused_broadcast_is_not_claimed_and_resumes_where_it_stopped(api, workspace, settings):
    settings.NOTIFY_BROADCAST_CHUNK = 2
    people(workspace, 3)
    body = broadcast(api, {"category": "welcome", "audience": {"all": True}})
    fan_out_chunk(broadcast_id=body["id"])
    row = Broadcast.objects.get(pk=body["id"])
    paused = api.post(f"/api/v1/broadcasts/{row.id}/pause").json()
    assert paused["state"] == "paused"
    # What its planned chunk reached is counted when it pauses, not at the next claim.
    assert Broadcast.objects.get(pk=row.id).planned_count == 2
    # Fan-out stops, and the senders leave what was planned alone.
    assert fan_out_chunk(broadcast_id=row.id).planned == 0
    ids = [str(i) for i in Delivery.objects.filter(notification__event_id=row.event_id).values_list("id", flat=True)]
    assert len(ids) == 2
    assert deliveries_claim(delivery_ids=ids)[1] == []
    assert api.post(f"/api/v1/broadcasts/{row.id}/pause").status_code == 409

    resumed = api.post(f"/api/v1/broadcasts/{row.id}/resume").json()
    assert resumed["state"] == "fanning_out"
    fan_out(broadcast_id=row.id)
    assert reached(body["id"]) == ["p0", "p1", "p2"]
    assert len(deliveries_claim(delivery_ids=ids)[1]) == 2


def test_cancel_stops_everything_not_yet_sent(api, workspace):
    people(workspace, 3)
    body = broadcast(api, {"category": "welcome", "audience": {"all": True}})
    fan_out(broadcast_id=body["id"])
    row = Broadcast.objects.get(pk=body["id"])
    ids = [str(i) for i in Delivery.objects.filter(notification__event_id=row.event_id).values_list("id", flat=True)]
    deliveries_claim(delivery_ids=ids[:1])  # one is being sent already
    response = api.post(f"/api/v1/broadcasts/{row.id}/cancel")
    assert response.json()["state"] == "cancelled"
    # Held from the moment of the cancel, before the cancel task has marked anything.
    assert deliveries_claim(delivery_ids=ids)[1] == []
    assert cancel_finish(broadcast_id=row.id) == 2
    statuses = sorted(Delivery.objects.filter(notification__event_id=row.event_id).values_list("status", flat=True))
    assert statuses == ["cancelled", "cancelled", "sending"]
    assert Notification.objects.filter(event_id=row.event_id, cancelled_at__isnull=False).count() == 2
    assert api.post(f"/api/v1/broadcasts/{row.id}/resume").status_code == 409
    counts = broadcast_roll_up(broadcast=Broadcast.objects.get(pk=row.pk), now=timezone.now())
    assert counts["cancelled"] == 2


def test_a_local_time_broadcast_is_due_at_nine_in_each_recipients_timezone(api, workspace):
    RecipientFactory(tenant=workspace.tenant, external_id="tokyo", timezone="Asia/Tokyo")
    RecipientFactory(tenant=workspace.tenant, external_id="new-york", timezone="America/New_York")
    body = broadcast(api, {"category": "welcome", "audience": {"all": True}, "send_at_local": "2031-03-01T09:00"})
    fan_out(broadcast_id=body["id"])
    due = dict(
        Delivery.objects.filter(notification__event__broadcast__id=body["id"]).values_list(
            "notification__recipient__external_id", "next_attempt_at"
        )
    )
    assert due["tokyo"] == datetime(2031, 3, 1, 9, tzinfo=ZoneInfo("Asia/Tokyo"))
    assert due["new-york"] == datetime(2031, 3, 1, 9, tzinfo=ZoneInfo("America/New_York"))
    # Not published yet: too far ahead for the broker, the sweeper publishes them when due.
    assert not Delivery.objects.filter(notification__event__broadcast__id=body["id"], published_at__isnull=False)


def test_a_paced_broadcast_spreads_its_send_times(api, workspace):
    people(workspace, 5)
    body = broadcast(api, {"category": "welcome", "audience": {"all": True}, "max_per_second": 2})
    fan_out(broadcast_id=body["id"])
    row = Broadcast.objects.get(pk=body["id"])
    times = sorted(
        Delivery.objects.filter(notification__event_id=row.event_id).values_list("next_attempt_at", flat=True)
    )
    offsets = [(t - row.started_at).total_seconds() for t in times]
    assert offsets == [0, 0, 1, 1, 2]
    estimate = api.get(f"/api/v1/broadcasts/{row.id}").json()["estimated_finish_at"]
    assert datetime.fromisoformat(estimate) == row.started_at + timedelta(seconds=2.5)


def test_spread_over_seconds_paces_by_the_audience_size(api, workspace):
    people(workspace, 6)
    body = broadcast(api, {"category": "welcome", "audience": {"all": True}, "spread_over_seconds": 3})
    fan_out(broadcast_id=body["id"])
    row = Broadcast.objects.get(pk=body["id"])
    times = Delivery.objects.filter(notification__event_id=row.event_id).values_list("next_attempt_at", flat=True)
    assert sorted({(t - row.started_at).total_seconds() for t in times}) == [0, 1, 2]


def test_a_scheduled_broadcast_waits_for_its_time(api, workspace):
    people(workspace, 1)
    send_at = datetime(2031, 1, 1, tzinfo=UTC)
    body = broadcast(api, {"category": "welcome", "audience": {"all": True}, "send_at": send_at.isoformat()})
    assert body["state"] == "scheduled"
    fan_out(broadcast_id=body["id"])
    assert reached(body["id"]) == []
    broadcasts_advance(now=send_at + timedelta(seconds=1))
    assert Broadcast.objects.get(pk=body["id"]).state == BroadcastState.FANNING_OUT


def test_reads_come_from_the_rollup_and_a_finished_broadcast_completes(api, workspace):
    people(workspace, 2)
    body = broadcast(api, {"category": "welcome", "audience": {"all": True}})
    fan_out(broadcast_id=body["id"])
    row = Broadcast.objects.get(pk=body["id"])
    Delivery.objects.filter(notification__event_id=row.event_id).update(status=DeliveryStatus.DELIVERED)
    read = api.get(f"/api/v1/broadcasts/{row.id}").json()
    assert read["counts"]["delivered"] == 0  # not rolled up yet
    broadcast_roll_up(broadcast=row, now=timezone.now())
    read = api.get(f"/api/v1/broadcasts/{row.id}").json()
    assert read["state"] == "completed"
    assert read["counts"] == {
        "audience": 2,
        "planned": 2,
        "sent": 2,
        "delivered": 2,
        "failed": 0,
        "suppressed": 0,
        "deferred": 0,
        "cancelled": 0,
    }
    assert [b["id"] for b in api.get("/api/v1/broadcasts").json()["results"]] == [str(row.id)]


def test_the_claim_statement_is_unchanged_while_no_broadcast_is_held(api, workspace):
    people(workspace, 1)
    body = broadcast(api, {"category": "welcome", "audience": {"all": True}})
    fan_out(broadcast_id=body["id"])
    ids = [str(i) for i in Delivery.objects.values_list("id", flat=True)]
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        deliveries_claim(delivery_ids=ids)
    update = next(q["sql"] for q in queries.captured_queries if q["sql"].startswith("UPDATE"))
    assert "EXISTS" not in update


def test_a_broadcast_whose_topic_was_deleted_stops_and_says_why(api, workspace):
    topic_with(workspace, "gone", people(workspace, 2))
    body = broadcast(api, {"category": "welcome", "audience": {"topic": "gone"}})
    Topic.objects.filter(key="gone").delete()
    fan_out(broadcast_id=body["id"])
    read = api.get(f"/api/v1/broadcasts/{body['id']}").json()
    assert read["state"] == "cancelled"
    assert read["note"] == "stopped: audience.topic: Unknown topic 'gone'."


def test_the_sweeper_leaves_a_paused_broadcast_alone_and_resume_publishes_it(
    api, workspace, broker, django_capture_on_commit_callbacks
):
    people(workspace, 3)
    body = broadcast(api, {"category": "welcome", "audience": {"all": True}})
    fan_out(broadcast_id=body["id"])
    row = Broadcast.objects.get(pk=body["id"])
    broadcast_pause(broadcast=row)
    later = timezone.now() + timedelta(minutes=10)  # long past the republish interval
    # An empty broker: the sweeper would republish everything stale (see dispatch.due_publish).
    broker.flushdb()
    with django_capture_on_commit_callbacks(execute=False) as published:
        assert sweep(now=later).republished == 0
    assert published == []
    broadcast_resume(broadcast=row)
    with django_capture_on_commit_callbacks(execute=False) as published:
        assert resume_publish(broadcast_id=row.id) == 3
    assert len(published) == 1  # one batch message for the three


def test_a_category_limited_key_broadcasts_and_sees_only_its_categories(api, workspace):
    people(workspace, 1)
    other = broadcast(api, {"category": "digest", "audience": {"all": True}})
    limited = client_for(ApiKeyFactory(tenant=workspace.tenant, categories=["welcome"]).raw_key)
    refused = broadcast(limited, {"category": "digest", "audience": {"all": True}}, expect=403)
    assert refused["error"]["code"] == "category_not_allowed"
    mine = broadcast(limited, {"category": "welcome", "audience": {"all": True}})
    assert [b["id"] for b in limited.get("/api/v1/broadcasts").json()["results"]] == [mine["id"]]
    assert limited.get(f"/api/v1/broadcasts/{other['id']}").status_code == 404
    assert limited.post(f"/api/v1/broadcasts/{other['id']}/cancel").status_code == 404


def test_another_tenants_broadcasts_and_audiences_are_out_of_reach(api, workspace):
    people(workspace, 1)
    topic_with(workspace, "news", [])
    mine = broadcast(api, {"category": "welcome", "audience": {"topic": "news"}})
    stranger = client_for(ApiKeyFactory().raw_key)
    assert stranger.get(f"/api/v1/broadcasts/{mine['id']}").status_code == 404
    assert stranger.post(f"/api/v1/broadcasts/{mine['id']}/pause").status_code == 404
    assert stranger.get("/api/v1/topics/news").status_code == 404
    refused = broadcast(stranger, {"category": "welcome", "audience": {"topic": "news"}}, expect=400)
    assert list(refused["error"]["fields"]) == ["category"]


def test_a_large_broadcast_is_counted_less_often(api, workspace):
    people(workspace, 2)
    small = broadcast(api, {"category": "welcome", "audience": {"all": True}})
    large = broadcast(api, {"category": "welcome", "audience": {"all": True}, "idempotency_key": "large"})
    for body in (small, large):
        fan_out(broadcast_id=body["id"])
    now = timezone.now()
    ten_seconds_ago = now - timedelta(seconds=10)
    Broadcast.objects.filter(pk=small["id"]).update(counts_at=ten_seconds_ago)
    # A million planned: counted every 25 s, so not yet.
    Broadcast.objects.filter(pk=large["id"]).update(counts_at=ten_seconds_ago, planned_count=1_000_000)
    broadcasts_advance(now=now)
    assert Broadcast.objects.get(pk=small["id"]).counts_at == now
    assert Broadcast.objects.get(pk=large["id"]).counts_at == ten_seconds_ago
    broadcasts_advance(now=now + timedelta(seconds=16))
    assert Broadcast.objects.get(pk=large["id"]).counts_at == now + timedelta(seconds=16)
