"""The broadcast list in the admin: progress, counts and the pause, resume and cancel buttons."""

import json

import pytest
from django.test import Client
from django.urls import reverse

from apps.audiences.models import Broadcast, BroadcastState, Topic, TopicMembership
from notify.pipeline.broadcast import broadcast_roll_up, fan_out
from tests.factories import RecipientFactory


@pytest.fixture
def ops(admin_user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(admin_user)
    return client


@pytest.fixture
def running(api, workspace) -> Broadcast:  # type: ignore[no-untyped-def]
    for i in range(4):
        RecipientFactory(tenant=workspace.tenant, external_id=f"p{i}")
    response = api.post(
        "/api/v1/broadcasts",
        data=json.dumps({"category": "welcome", "audience": {"all": True}}),
        content_type="application/json",
    )
    broadcast = Broadcast.objects.get(pk=response.json()["id"])
    fan_out(broadcast_id=broadcast.id)
    broadcast.refresh_from_db()
    broadcast_roll_up(broadcast=broadcast, now=broadcast.started_at)
    return broadcast


def test_the_list_shows_progress_counts_and_the_controls_that_apply(ops, running):
    page = ops.get(reverse("admin:audiences_broadcast_changelist")).content.decode()
    assert '<progress value="0" max="4"' in page
    assert "planned 4 of 4" in page
    assert reverse("admin:audiences_broadcast_pause", args=[running.pk]) in page
    assert reverse("admin:audiences_broadcast_cancel", args=[running.pk]) in page
    assert reverse("admin:audiences_broadcast_resume", args=[running.pk]) not in page


def test_the_buttons_pause_resume_and_cancel(ops, running):
    response = ops.post(reverse("admin:audiences_broadcast_pause", args=[running.pk]), follow=True)
    assert "pause done" in response.content.decode()
    running.refresh_from_db()
    assert running.state == BroadcastState.PAUSED
    ops.post(reverse("admin:audiences_broadcast_resume", args=[running.pk]))
    running.refresh_from_db()
    assert running.state == BroadcastState.SENDING
    ops.post(reverse("admin:audiences_broadcast_cancel", args=[running.pk]))
    running.refresh_from_db()
    assert running.state == BroadcastState.CANCELLED
    response = ops.post(reverse("admin:audiences_broadcast_cancel", args=[running.pk]), follow=True)
    assert "cancelled already" in response.content.decode()
    assert ops.get(reverse("admin:audiences_broadcast_cancel", args=[running.pk])).status_code == 405


def test_a_recipients_topics_are_on_its_admin_page(ops, workspace):
    recipient = RecipientFactory(tenant=workspace.tenant, external_id="ada")
    TopicMembership.objects.create(
        topic=Topic.objects.create(tenant=workspace.tenant, key="launches"), recipient=recipient
    )
    page = ops.get(reverse("admin:recipients_recipient_change", args=[recipient.pk])).content.decode()
    assert "launches" in page


def test_a_segment_with_a_bad_filter_is_refused_in_the_admin(ops, workspace):
    response = ops.post(
        reverse("admin:audiences_segment_add"),
        {"tenant": workspace.tenant.pk, "key": "bad", "name": "", "filter": '{"field": "locale", "like": "e"}'},
    )
    assert "filter.like: Unknown operator" in response.content.decode()
