"""Broadcasts end to end: real worker processes fan out and send, through Redis, PostgreSQL
and the sandbox, and the sandbox counts what each person received."""

import json
import time
from collections import Counter

import pytest
from rest_framework.test import APIClient

from apps.audiences.models import Broadcast, BroadcastState, Topic, TopicMembership
from apps.catalog.models import CategoryKind, Priority
from apps.deliveries.models import Notification
from apps.recipients.models import Consent, Recipient
from tests.factories import CategoryFactory
from tests.helpers import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


def audience(workspace, key: str, count: int, *, prefix: str = "r") -> Topic:  # type: ignore[no-untyped-def]
    """A topic of `count` new recipients, written in bulk."""
    topic = Topic.objects.create(tenant=workspace.tenant, key=key)
    recipients = Recipient.objects.bulk_create(
        [
            Recipient(tenant=workspace.tenant, external_id=f"{prefix}{i}", email=f"{prefix}{i}@example.com")
            for i in range(count)
        ]
    )
    TopicMembership.objects.bulk_create([TopicMembership(topic=topic, recipient=r) for r in recipients])
    return topic


def start(api: APIClient, body: dict) -> str:  # type: ignore[type-arg]
    response = api.post("/api/v1/broadcasts", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 202, response.content
    return response.json()["id"]


def received(sandbox) -> Counter[str]:  # type: ignore[no-untyped-def]
    return Counter(r["to"] for r in sandbox.requests_log() if r["outcome"] == "accepted")


def read(api: APIClient, broadcast_id: str) -> dict:  # type: ignore[type-arg]
    return api.get(f"/api/v1/broadcasts/{broadcast_id}").json()


def test_a_topic_broadcast_with_an_exclusion_is_delivered_once_to_each(api, workspace, workers, sandbox):
    audience(workspace, "news", 120)
    muted = Topic.objects.create(tenant=workspace.tenant, key="muted")
    TopicMembership.objects.bulk_create(
        [TopicMembership(topic=muted, recipient=r) for r in Recipient.objects.filter(external_id__in=["r0", "r1"])]
    )
    workers.start("maintenance")
    workers.start("bulk")
    workers.start_beat()
    broadcast_id = start(
        api,
        {"category": "digest", "audience": {"topic": "news", "exclude": {"topic": "muted"}}, "data": {"name": "all"}},
    )
    wait_for(lambda: read(api, broadcast_id)["state"] == "completed", timeout=60, what="the broadcast to complete")
    got = received(sandbox)
    assert set(got) == {f"r{i}@example.com" for i in range(2, 120)}
    assert set(got.values()) == {1}
    body = read(api, broadcast_id)
    assert body["counts"]["audience"] == body["counts"]["planned"] == body["counts"]["sent"] == 118
    assert body["started_at"] and body["finished_at"]


def test_a_marketing_broadcast_reaches_only_those_who_consented(api, workspace, workers, sandbox):
    CategoryFactory(tenant=workspace.tenant, key="offers", kind=CategoryKind.MARKETING, default_priority=Priority.BULK)
    audience(workspace, "all-customers", 6)
    for external_id, granted in [("r0", True), ("r1", True), ("r2", False)]:
        recipient = Recipient.objects.get(external_id=external_id)
        Consent.objects.create(
            tenant=workspace.tenant, recipient=recipient, channel="email", granted=granted, source="test"
        )
    workers.start("maintenance")
    workers.start("bulk")
    workers.start_beat()
    broadcast_id = start(api, {"category": "offers", "audience": {"topic": "all-customers"}})
    wait_for(lambda: read(api, broadcast_id)["state"] == "completed", timeout=60, what="the broadcast to complete")
    assert received(sandbox) == Counter({"r0@example.com": 1, "r1@example.com": 1})
    counts = read(api, broadcast_id)["counts"]
    assert (counts["sent"], counts["suppressed"]) == (2, 4)


def test_pause_holds_the_sending_resume_goes_on_and_cancel_stops_the_rest(api, workspace, workers, sandbox):
    sandbox.faults_set(latency_ms=200)  # each batch of 50 is one provider request
    audience(workspace, "news", 600)
    workers.start("maintenance")
    workers.start("bulk")
    workers.start_beat()
    broadcast_id = start(api, {"category": "digest", "audience": {"topic": "news"}})
    wait_for(lambda: sandbox.stats()["total"] >= 50, what="the sending to be under way")
    assert api.post(f"/api/v1/broadcasts/{broadcast_id}/pause").status_code == 200
    time.sleep(1.0)  # a batch already claimed finishes
    held = sandbox.stats()["total"]
    time.sleep(2.5)  # longer than the sweeper's republish interval in tests
    assert sandbox.stats()["total"] == held
    assert held < 600

    assert api.post(f"/api/v1/broadcasts/{broadcast_id}/resume").status_code == 200
    wait_for(lambda: sandbox.stats()["total"] >= held + 100, what="sending to go on")
    assert api.post(f"/api/v1/broadcasts/{broadcast_id}/cancel").status_code == 200
    wait_for(lambda: Broadcast.objects.get(pk=broadcast_id).cancel_finished_at is not None, what="the cancel to finish")
    time.sleep(1.0)
    got = received(sandbox)
    assert set(got.values()) == {1}
    body = read(api, broadcast_id)
    assert body["state"] == "cancelled"
    wait_for(
        lambda: read(api, broadcast_id)["counts"]["cancelled"] == 600 - len(got),
        what=f"the rollup to count {600 - len(got)} cancelled ({read(api, broadcast_id)['counts']})",
    )
    assert len(got) < 600


def test_a_fan_out_worker_killed_mid_broadcast_resumes_and_each_recipient_gets_it_once(
    api, workspace, workers, sandbox, monkeypatch
):
    # Small chunks and a short lease, so the kill lands mid-fan-out and recovery is quick.
    monkeypatch.setenv("NOTIFY_BROADCAST_CHUNK", "40")
    monkeypatch.setenv("NOTIFY_BROADCAST_LEASE_SECONDS", "2")
    total = 3000
    audience(workspace, "everyone", total)
    doomed = workers.start("maintenance")
    broadcast_id = start(api, {"category": "digest", "audience": {"topic": "everyone"}})
    wait_for(
        lambda: Broadcast.objects.get(pk=broadcast_id).planned_count >= 200,
        interval=0.01,
        what="fan-out to be under way",
    )
    doomed.kill()
    stopped_at = Broadcast.objects.get(pk=broadcast_id)
    assert stopped_at.planned_count < total, "fan-out finished before the kill: the test proved nothing"
    assert stopped_at.state == BroadcastState.FANNING_OUT

    # Two processes: the fan-out tasks plan chunks side by side, and one of them takes over the
    # chunk the killed worker held once its lease runs out.
    workers.start("maintenance", concurrency=2)
    workers.start("bulk", concurrency=2)
    workers.start_beat()
    wait_for(lambda: sandbox.stats()["total"] >= total, timeout=120, what=f"{total} messages at the sandbox")
    time.sleep(1.0)  # anything sent twice would arrive now
    got = received(sandbox)
    assert len(got) == total
    assert set(got.values()) == {1}
    assert Notification.objects.filter(event__broadcast__id=broadcast_id).count() == total
    row = Broadcast.objects.get(pk=broadcast_id)
    assert (row.planned_count, row.audience_count) == (total, total)
